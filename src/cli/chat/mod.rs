//! `starling chat`: an interactive chat in the terminal with a model loaded here or a
//! running server (`--url`). Replies stream as they are generated; the conversation is one
//! server-side session; Ctrl-C stops the current reply (not the program); slash commands
//! change sampling and the conversation. With stdin piped, each line is one turn.

mod backend;

use std::io::{BufRead, IsTerminal, Write};
use std::num::NonZeroUsize;

use anyhow::{Context, Result, bail};
use clap::Args;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use super::common::default_threads;
use backend::{Backend, Local, Remote, Settings, Turn, TurnStats};
use starling::config::{Config, Format};
use starling::engine::load::start_model;
use starling::gateway::template::ChatMessage;
use starling::gateway::template::sandbox::{Limits, TemplateSandbox};

/// The prompt shown before each line typed.
const PROMPT: &str = "you> ";

/// What `/help` prints.
const HELP: &str = "\
/temperature X   sampling temperature (0 = greedy)
/top_p X         nucleus sampling mass, in (0, 1]
/seed N          sampling seed (the same seed repeats a reply)
/max_tokens N    longest reply, in tokens
/system TEXT     set the system message (and start over)
/reset           forget the conversation (a new session)
/stats           figures of the last reply: tokens/s, cached tokens
/help            this list
/exit            leave (as does Ctrl-D); Ctrl-C stops a reply";

#[derive(Args)]
pub struct ChatArgs {
    /// Model to load in this process: a GGUF file or a model name (default: smollm2-135m).
    #[arg(value_name = "MODEL", conflicts_with = "url")]
    model: Option<String>,
    /// Chat with a running server at this base URL (http://host:port) instead.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// With --url: bearer key for the server.
    #[arg(long, requires = "url", env = "STARLING_API_KEY")]
    api_key: Option<String>,
    /// With --url: the served model to talk to (default: the server's first).
    #[arg(long, requires = "url")]
    served_model: Option<String>,
    /// System message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest reply, in tokens.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Threads for the model's matrix work (a local model).
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
}

/// The conversation and what the slash commands set.
struct Chat {
    backend: Backend,
    settings: Settings,
    system: Option<String>,
    /// User and assistant messages, alternating.
    history: Vec<ChatMessage>,
    /// The session the conversation lives in; `/reset` starts another.
    session: String,
    /// Sessions started so far (part of the next session's name).
    sessions: u32,
    /// A turn was sent in `session` (so there is a session to close).
    session_used: bool,
    /// The last finished turn's figures.
    last: Option<TurnStats>,
}

/// What a line asks for.
enum Step {
    /// Go on reading lines.
    Continue,
    /// Leave.
    Exit,
}

/// Opens the backend and runs the conversation until `/exit`, Ctrl-D or the end of stdin.
pub fn run(a: ChatArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let backend = match &a.url {
        Some(url) => Backend::Remote(Remote {
            authority: Remote::authority(url)?,
            api_key: a.api_key.clone(),
            model: a.served_model.clone(),
        }),
        None => {
            let path = super::catalog::resolve(a.model.as_deref().unwrap_or("smollm2-135m"))?;
            let mut config = Config::from_str("{}", Format::Json)?;
            config.models[0].path = path;
            config.models[0].threads = NonZeroUsize::new(a.threads.max(1)).unwrap_or(NonZeroUsize::MIN);
            let loading =
                super::progress::Progress::new(false).spinner(&format!("loading {}", config.models[0].path.display()));
            let model = start_model(&config, 0)?;
            loading.finish_and_clear();
            let templates = TemplateSandbox::this_binary(Limits::of(&config), 1);
            Backend::Local(Box::new(Local { config, model, templates }))
        }
    };
    let settings = Settings { temperature: a.temperature, top_p: a.top_p, seed: a.seed, max_tokens: a.max_tokens };
    let mut chat = Chat {
        backend,
        settings,
        system: a.system,
        history: vec![],
        session: String::new(),
        sessions: 0,
        session_used: false,
        last: None,
    };
    chat.new_session();
    if std::io::stdin().is_terminal() { interactive(&mut chat, &runtime) } else { piped(&mut chat, &runtime) }
}

/// The line editor loop: history, editing, Ctrl-C clears the line, Ctrl-D leaves.
fn interactive(chat: &mut Chat, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let mut editor = DefaultEditor::new().context("cannot open the line editor")?;
    println!("chatting; /help lists the commands, Ctrl-C stops a reply, /exit or Ctrl-D leaves");
    loop {
        match editor.readline(PROMPT) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if let Step::Exit = chat.line(&line, runtime) {
                    return Ok(());
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => return Ok(()),
            Err(e) => bail!("cannot read the terminal: {e}"),
        }
    }
}

/// One turn per line of stdin, no editor. Lines are read on a thread, so Ctrl-C while
/// waiting for one leaves (the signal is handled here, not by the default action).
fn piped(chat: &mut Chat, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let next = runtime.block_on(async {
            tokio::select! {
                line = rx.recv() => line,
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        match next {
            None => return Ok(()),
            Some(Err(e)) => bail!("cannot read stdin: {e}"),
            Some(Ok(line)) => {
                if let Step::Exit = chat.line(&line, runtime) {
                    return Ok(());
                }
            }
        }
    }
}

impl Chat {
    /// Starts a fresh session name (the server keeps the old one until it is evicted).
    fn new_session(&mut self) {
        self.sessions += 1;
        self.session = format!("chat-{}-{:x}-{}", std::process::id(), random_u64(), self.sessions);
    }

    /// Handles one line: a slash command or a turn.
    fn line(&mut self, line: &str, runtime: &tokio::runtime::Runtime) -> Step {
        let line = line.trim();
        if line.is_empty() {
            return Step::Continue;
        }
        match line.strip_prefix('/') {
            Some(command) => self.command(command, runtime),
            None => {
                self.say(line, runtime);
                Step::Continue
            }
        }
    }

    /// A slash command; a bad one says what is wrong and changes nothing.
    fn command(&mut self, command: &str, runtime: &tokio::runtime::Runtime) -> Step {
        let (name, arg) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
        let arg = arg.trim();
        let result = match name {
            "temperature" => parse(arg, "a number").map(|v| self.settings.temperature = Some(v)),
            "top_p" => parse(arg, "a number").map(|v| self.settings.top_p = Some(v)),
            "seed" => parse(arg, "an integer").map(|v| self.settings.seed = Some(v)),
            "max_tokens" => parse(arg, "an integer").map(|v| self.settings.max_tokens = Some(v)),
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_owned());
                self.reset(runtime);
                Ok(())
            }
            "reset" => {
                self.reset(runtime);
                Ok(())
            }
            "stats" => {
                self.print_stats();
                Ok(())
            }
            "help" => {
                println!("{HELP}");
                Ok(())
            }
            "exit" | "quit" => return Step::Exit,
            _ => Err(format!("unknown command /{name}; /help lists them")),
        };
        if let Err(e) = result {
            eprintln!("error: {e}");
        }
        Step::Continue
    }

    /// Forgets the conversation, closes its session (freeing its cache now rather than at
    /// eviction) and starts a new one.
    fn reset(&mut self, runtime: &tokio::runtime::Runtime) {
        self.history.clear();
        self.last = None;
        if std::mem::take(&mut self.session_used)
            && let Err(e) = runtime.block_on(self.backend.close_session(&self.session))
        {
            eprintln!("warning: the old session was not closed ({e:#}); the server evicts it in time");
        }
        self.new_session();
    }

    fn print_stats(&self) {
        let s = &self.settings;
        let show = |v: Option<String>| v.unwrap_or_else(|| "default".to_owned());
        println!(
            "settings: temperature {}, top_p {}, seed {}, max_tokens {}",
            show(s.temperature.map(|v| v.to_string())),
            show(s.top_p.map(|v| v.to_string())),
            show(s.seed.map(|v| v.to_string())),
            show(s.max_tokens.map(|v| v.to_string())),
        );
        match &self.last {
            None => println!("no reply yet"),
            Some(t) => {
                println!("prompt tokens: {}", t.prompt_tokens);
                println!("cached tokens: {}", t.cached_tokens);
                println!("completion tokens: {}", t.completion_tokens);
                println!("tokens/s: {:.1}", t.tokens_per_second());
                println!("time to first token: {} ms", t.first_token.as_millis());
            }
        }
        if let Some(n) = self.backend.sessions_held() {
            println!("sessions held: {n}");
        }
    }

    /// Sends `text` as the user's turn and streams the reply; Ctrl-C stops it, keeping what
    /// was said. A failed turn is forgotten.
    fn say(&mut self, text: &str, runtime: &tokio::runtime::Runtime) {
        self.history.push(ChatMessage { role: "user".to_owned(), content: text.to_owned(), ..Default::default() });
        let messages: Vec<ChatMessage> = self
            .system
            .iter()
            .map(|s| ChatMessage { role: "system".to_owned(), content: s.clone(), ..Default::default() })
            .chain(self.history.iter().cloned())
            .collect();
        let turn = Turn { messages: &messages, session: &self.session, settings: &self.settings };
        self.session_used = true;
        let mut reply = String::new();
        let mut stdout = std::io::stdout();
        let outcome = runtime.block_on(async {
            let mut on_text = |piece: &str| {
                reply.push_str(piece);
                // A closed stdout only loses the text.
                let _ = stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush());
            };
            tokio::select! {
                r = self.backend.turn(&turn, &mut on_text) => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        match outcome {
            Some(Ok(stats)) => {
                println!();
                self.last = Some(stats);
                self.history.push(ChatMessage { role: "assistant".to_owned(), content: reply, ..Default::default() });
            }
            Some(Err(e)) => {
                if !reply.is_empty() {
                    println!();
                }
                eprintln!("error: {e:#}");
                self.history.pop();
            }
            None => {
                println!("\n[cancelled]");
                self.history.push(ChatMessage { role: "assistant".to_owned(), content: reply, ..Default::default() });
            }
        }
    }
}

/// `arg` as a `T`, or an error naming what was expected.
fn parse<T: std::str::FromStr>(arg: &str, what: &str) -> Result<T, String> {
    arg.parse().map_err(|_| format!("`{arg}` is not {what}"))
}

/// A random number for session names (two processes never share a session).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

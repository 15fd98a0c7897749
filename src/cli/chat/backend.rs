//! Where `starling chat` sends a turn: a model in this process (the generation service
//! `generate` uses, the model's chat template rendered here) or a running server
//! (`/v1/chat/completions`, streamed). Either way the conversation lives in a server-side
//! session, so each turn recomputes only what the previous one did not hold.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use starling::config::Config;
use starling::engine::load::LoadedModel;
use starling::gateway::service::{self, Job, Origin};
use starling::gateway::template::ChatMessage;
use starling::gateway::template::sandbox::{RenderJob, TemplateSandbox};
use starling::protocol::sse::{SseEvents, event_data};
use starling::protocol::{EngineCommand, PromptInput, SamplingParams};
use starling::types::{SessionId, TenantId};

/// The sampling settings the slash commands change; unset ones are the server's defaults.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `/temperature X`.
    pub temperature: Option<f32>,
    /// `/top_p X`.
    pub top_p: Option<f32>,
    /// `/seed N`.
    pub seed: Option<u64>,
    /// `/max_tokens N`.
    pub max_tokens: Option<u32>,
}

/// One turn to send: the whole conversation (the session makes the repeat cheap).
pub struct Turn<'a> {
    /// System message (if any) first, then alternating user and assistant messages.
    pub messages: &'a [ChatMessage],
    /// The conversation's session name.
    pub session: &'a str,
    /// Sampling for this turn.
    pub settings: &'a Settings,
}

/// What a finished turn reports (`/stats`).
#[derive(Clone, Copy, Debug, Default)]
pub struct TurnStats {
    /// Prompt tokens of the turn (the whole conversation so far).
    pub prompt_tokens: usize,
    /// Prompt tokens the session already held (not recomputed).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// From sending the turn to its first text.
    pub first_token: Duration,
    /// From sending the turn to its end.
    pub total: Duration,
}

impl TurnStats {
    /// Generated tokens per second after the first one arrived.
    pub fn tokens_per_second(&self) -> f64 {
        let decode = self.total.saturating_sub(self.first_token).as_secs_f64();
        if self.completion_tokens > 1 && decode > 0.0 {
            (self.completion_tokens - 1) as f64 / decode
        } else if self.total.as_secs_f64() > 0.0 {
            self.completion_tokens as f64 / self.total.as_secs_f64()
        } else {
            0.0
        }
    }
}

/// A model loaded in this process.
pub struct Local {
    /// The config the model was started from (limits, default timeout).
    pub config: Config,
    /// The model and its engine.
    pub model: LoadedModel,
    /// Worker processes the model's chat template renders in, as the server's do.
    pub templates: TemplateSandbox,
}

/// A running server.
pub struct Remote {
    /// `host:port` of the server.
    pub authority: String,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// The served model to route to (default: the server's first).
    pub model: Option<String>,
}

/// Where turns go.
pub enum Backend {
    /// In this process.
    Local(Box<Local>),
    /// Over HTTP.
    Remote(Remote),
}

impl Backend {
    /// Runs one turn, handing text to `on_text` as it arrives. Dropping the future cancels
    /// the turn (the engine or server sees its reader gone).
    pub async fn turn(&self, turn: &Turn<'_>, on_text: &mut dyn FnMut(&str)) -> Result<TurnStats> {
        match self {
            Backend::Local(local) => local.turn(turn, on_text).await,
            Backend::Remote(remote) => remote.turn(turn, on_text).await,
        }
    }

    /// Sessions the local engine holds (a server's are its own business).
    pub fn sessions_held(&self) -> Option<usize> {
        match self {
            Backend::Local(local) => Some(local.model.engine.status.sessions.load(Ordering::Relaxed)),
            Backend::Remote(_) => None,
        }
    }

    /// Ends the conversation's session so its cache is freed now, not at eviction.
    pub async fn close_session(&self, session: &str) -> Result<()> {
        match self {
            Backend::Local(local) => {
                let (reply, wait) = tokio::sync::oneshot::channel();
                let session = SessionId(session.to_owned());
                let command = EngineCommand::CloseSession { tenant: TenantId::from(CLI_TENANT), session, reply };
                local.model.engine.send(command).map_err(|e| anyhow!("{}", e.message))?;
                wait.await.context("the engine stopped")?.map_err(|e| anyhow!("{}", e.message))
            }
            Backend::Remote(remote) => {
                let mut body = json!({"session_id": session});
                if let Some(model) = &remote.model {
                    body["model"] = json!(model);
                }
                remote.post("/v1/session/close", &body).await.map(drop)
            }
        }
    }
}

/// The tenant a local chat's requests and session belong to.
const CLI_TENANT: &str = "cli";

impl Local {
    async fn turn(&self, turn: &Turn<'_>, on_text: &mut dyn FnMut(&str)) -> Result<TurnStats> {
        let sent = Instant::now();
        let job = RenderJob::new(self.model.id.as_str(), &self.model.tokenizer, turn.messages.to_vec());
        let text = self.templates.render(&job)?;
        let params = SamplingParams {
            temperature: turn.settings.temperature,
            top_p: turn.settings.top_p,
            seed: turn.settings.seed,
            max_tokens: turn.settings.max_tokens,
            ..SamplingParams::default()
        };
        let sampling = service::validate_sampling(&self.config.limits, &self.model, &params)
            .map_err(|e| anyhow!("{}", e.message))?;
        let job = Job::new(
            PromptInput::Text { text, parse_special: true },
            sampling,
            Some(SessionId(turn.session.to_owned())),
        );
        let origin = Origin { tenant: TenantId::from(CLI_TENANT), client_id: None, received_at: sent };
        let sub = service::start(&self.model, origin, job, self.config.limits.default_timeout)
            .await
            .map_err(|e| anyhow!("{}", e.message))?;
        let mut first = None;
        let out = service::collect_streaming(sub, |piece| {
            if !piece.is_empty() {
                first.get_or_insert_with(|| sent.elapsed());
                on_text(piece);
            }
        })
        .await
        .map_err(|e| anyhow!("{} ({})", e.message, e.kind.as_str()))?;
        let total = sent.elapsed();
        Ok(TurnStats {
            prompt_tokens: out.usage.prompt_tokens,
            cached_tokens: out.usage.cached_tokens,
            completion_tokens: out.usage.completion_tokens,
            first_token: first.unwrap_or(total),
            total,
        })
    }
}

impl Remote {
    /// `host:port` of an `http://` base URL (https is not spoken).
    pub fn authority(url: &str) -> Result<String> {
        let rest = url.strip_prefix("http://").with_context(|| format!("--url must be an http:// URL, got `{url}`"))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            bail!("--url takes the server's base URL (http://host:port), got `{url}`");
        }
        Ok(if host.contains(':') { host.to_owned() } else { format!("{host}:80") })
    }

    /// The request body of one turn.
    fn body(&self, turn: &Turn<'_>) -> Value {
        let messages: Vec<Value> =
            turn.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let mut body = json!({
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "session_id": turn.session,
        });
        let s = turn.settings;
        let fields = [
            ("model", self.model.as_ref().map(|m| json!(m))),
            ("temperature", s.temperature.map(|v| json!(v))),
            ("top_p", s.top_p.map(|v| json!(v))),
            ("seed", s.seed.map(|v| json!(v))),
            ("max_tokens", s.max_tokens.map(|v| json!(v))),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                body[name] = v;
            }
        }
        body
    }

    /// POSTs `body` to `path` and returns the JSON answer; an error status is an error
    /// carrying the server's message.
    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let (mut sender, conn) = self.connect().await?;
        tokio::spawn(conn);
        let response = sender.send_request(self.request(path, body)?).await.context("the server did not answer")?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if !status.is_success() {
            bail!("HTTP {}: {}", status.as_u16(), error_message(&bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{path} did not answer JSON"))
    }

    /// An HTTP/1 connection to the server: the request sender, and the connection future the
    /// caller must drive.
    async fn connect(&self) -> Result<(SendRequest<Full<Bytes>>, Connection<TokioIo<TcpStream>, Full<Bytes>>)> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot connect to {}", self.authority))?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("no HTTP from {}", self.authority))
    }

    /// A JSON POST to this server, with the API key if there is one.
    fn request(&self, path: &str, body: &Value) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::post(path).header("host", &self.authority).header("content-type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        Ok(req.body(Full::new(Bytes::from(body.to_string())))?)
    }

    async fn turn(&self, turn: &Turn<'_>, on_text: &mut dyn FnMut(&str)) -> Result<TurnStats> {
        let sent = Instant::now();
        let (mut sender, conn) = self.connect().await?;
        let req = self.request("/v1/chat/completions", &self.body(turn))?;
        let work = async move {
            let response = sender.send_request(req).await.context("the server did not answer")?;
            let status = response.status();
            if !status.is_success() {
                let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                bail!("HTTP {}: {}", status.as_u16(), error_message(&bytes));
            }
            read_chunks(response.into_body(), sent, on_text).await
        };
        // The connection is driven here, not on a spawned task, so dropping this future
        // (Ctrl-C) closes the socket at once and the server cancels the generation.
        tokio::pin!(work, conn);
        tokio::select! {
            biased;
            r = &mut work => return r,
            _ = &mut conn => {}
        }
        work.await
    }
}

/// Reads OpenAI chat chunks (`data: {..}` frames) until `data: [DONE]`.
async fn read_chunks(
    mut body: hyper::body::Incoming,
    sent: Instant,
    on_text: &mut dyn FnMut(&str),
) -> Result<TurnStats> {
    let mut stats = TurnStats::default();
    let mut first = None;
    let mut events = SseEvents::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the stream broke")?;
        let Some(data) = frame.data_ref() else { continue };
        for event in events.push(data) {
            let Some(data) = event_data(&event) else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                stats.total = sent.elapsed();
                stats.first_token = first.unwrap_or(stats.total);
                return Ok(stats);
            }
            let v: Value = serde_json::from_str(data).with_context(|| format!("not a JSON chunk: {data}"))?;
            if v.get("error").is_some() {
                bail!("{}", error_message(data.as_bytes()));
            }
            if let Some(text) = v["choices"][0]["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                first.get_or_insert_with(|| sent.elapsed());
                on_text(text);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                let n = |v: &Value| v.as_u64().unwrap_or(0) as usize;
                stats.prompt_tokens = n(&u["prompt_tokens"]);
                stats.completion_tokens = n(&u["completion_tokens"]);
                stats.cached_tokens = n(&u["prompt_tokens_details"]["cached_tokens"]);
            }
        }
    }
    bail!("the stream ended before the reply did")
}

/// The `error.message` of an error body, else the body itself.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

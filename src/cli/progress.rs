//! Progress on long steps (downloads, model loads, bench phases, perplexity): `indicatif`
//! bars on stderr when stderr is a terminal; otherwise (piped, `--json`, `CI=true`) plain
//! one-line messages, or nothing under `--json`.

use std::io::IsTerminal;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a command reports progress; made once from its flags and the environment.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Bars are drawn (stderr is a terminal, no `--json`, not `CI=true`).
    bars: bool,
    /// Plain one-line messages are printed when there are no bars (no `--json`).
    messages: bool,
}

impl Progress {
    /// Bars on a terminal; plain messages when piped or under `CI=true`; silence with `json`.
    pub fn new(json: bool) -> Progress {
        let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Progress { bars: !json && !ci && std::io::stderr().is_terminal(), messages: !json }
    }

    /// Whether bars are drawn (a child process may then draw its own).
    pub fn is_terminal(&self) -> bool {
        self.bars
    }

    /// A one-line message on stderr (above any bar), unless under `--json`.
    pub fn message(&self, text: &str) {
        if self.messages {
            eprintln!("{text}");
        }
    }

    /// A byte counter with rate and ETA; hidden when bars are off.
    pub fn bytes(&self, total: u64, label: &str) -> ProgressBar {
        self.bar(total, label, "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    }

    /// A download's counter: a bar with rate and ETA when its length is known, else bytes
    /// and rate beside a spinner; hidden when bars are off.
    pub fn transfer(&self, total: Option<u64>, label: &str) -> ProgressBar {
        match total {
            Some(total) => self.bytes(total, label),
            None if self.bars => {
                let bar = self.spinner(label);
                let style = ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
                bar.set_style(style);
                bar
            }
            None => ProgressBar::hidden(),
        }
    }

    /// A spinner for a step of unknown length (a model load, a benchmark); hidden when
    /// bars are off (the step's result says enough).
    pub fn spinner(&self, label: &str) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        // Drawn at once, however short the step.
        bar.tick();
        bar
    }

    fn bar(&self, total: u64, label: &str, template: &str) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(label.to_owned());
        bar.tick();
        bar
    }
}

//! Hold-back matching of stop strings and output-policy rules on streamed text.
//!
//! Decoded text arrives piece by piece. The gate releases text only once it is decided:
//! a stop string or rule match may begin in it no more. Stop strings are exact: the gate
//! holds back the longest tail that is a proper prefix of some stop string. Policy rules
//! hold back `window - 1` bytes (see [`PolicyRules`] for how the window is bounded).
//! On a match, the text before it is released, the match and everything after it are
//! dropped, and the gate reports how generation ends.

use std::sync::Arc;

use super::policy::PolicyRules;

/// Why the text ended generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateEnd {
    /// A stop string matched (finish reason `stop`).
    Stop,
    /// An output-policy rule matched (finish reason `content_filter`).
    ContentFilter,
}

impl GateEnd {
    /// The wire finish reason.
    pub fn as_str(self) -> &'static str {
        match self {
            GateEnd::Stop => "stop",
            GateEnd::ContentFilter => "content_filter",
        }
    }
}

/// What one [`TextGate::push`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateStep {
    /// Text safe to send to the client now (possibly empty).
    pub emit: String,
    /// Set when generation must end; no more text will be released.
    pub end: Option<GateEnd>,
}

/// Per-sequence matcher for stop strings and output-policy rules.
#[derive(Clone, Debug)]
pub struct TextGate {
    stops: Vec<String>,
    rules: Option<Arc<PolicyRules>>,
    pending: String,
    ended: Option<GateEnd>,
}

impl TextGate {
    /// A gate for `stops` (empty strings are ignored) and optional output rules.
    pub fn new(stops: &[String], output_rules: Option<Arc<PolicyRules>>) -> Self {
        TextGate {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            rules: output_rules.filter(|r| !r.is_empty()),
            pending: String::new(),
            ended: None,
        }
    }

    /// Feeds newly decoded text; returns the text safe to emit now and whether generation
    /// must end. After an end, further pushes emit nothing and repeat the end.
    pub fn push(&mut self, text: &str) -> GateStep {
        if let Some(end) = self.ended {
            return GateStep { emit: String::new(), end: Some(end) };
        }
        self.pending.push_str(text);
        if let Some((at, end)) = self.first_match() {
            self.pending.truncate(at);
            self.ended = Some(end);
            return GateStep { emit: std::mem::take(&mut self.pending), end: Some(end) };
        }
        let keep = self.hold_back();
        let cut = self.pending.floor_char_boundary(self.pending.len() - keep);
        let emit = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        GateStep { emit, end: None }
    }

    /// Releases the held-back text when generation ends for another reason (EOS,
    /// length). Empty after a stop or content-filter end.
    pub fn finish(&mut self) -> String {
        if self.ended.is_some() {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// How the gate ended, if it did.
    pub fn ended(&self) -> Option<GateEnd> {
        self.ended
    }

    /// The earliest match in the pending text; a rule match wins a tie with a stop string.
    fn first_match(&self) -> Option<(usize, GateEnd)> {
        let stop = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        let rule = self.rules.as_ref().and_then(|r| r.find(&self.pending)).map(|m| m.start);
        match (stop, rule) {
            (Some(s), Some(r)) if s < r => Some((s, GateEnd::Stop)),
            (_, Some(r)) => Some((r, GateEnd::ContentFilter)),
            (Some(s), None) => Some((s, GateEnd::Stop)),
            (None, None) => None,
        }
    }

    /// Bytes at the end of the pending text that must wait for more text.
    fn hold_back(&self) -> usize {
        let text = self.pending.as_bytes();
        let stop_tail = self.stops.iter().map(|s| partial_prefix_len(text, s.as_bytes())).max().unwrap_or(0);
        let rule_tail = self.rules.as_ref().map_or(0, |r| r.window().saturating_sub(1));
        stop_tail.max(rule_tail).min(text.len())
    }
}

/// The length of the longest tail of `text` that is a proper prefix of `stop`.
fn partial_prefix_len(text: &[u8], stop: &[u8]) -> usize {
    let longest = (stop.len() - 1).min(text.len());
    (1..=longest).rev().find(|&k| text.ends_with(&stop[..k])).unwrap_or(0)
}

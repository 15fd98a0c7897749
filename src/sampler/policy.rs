//! Content policy rules: literal phrases (case-insensitive) and regexes, compiled once.
//!
//! The same rules serve two stages the engine can enable per pipeline: the input policy
//! refuses a prompt that matches ([`PolicyRules::check_input`], a 400 `content_policy`),
//! and the output policy ends a generation whose text matches (through `TextGate`, with
//! finish reason `content_filter`).
//!
//! # How far output matching reaches back
//!
//! Streamed text is released only once no rule could still match across it, which means
//! holding back the last `window - 1` bytes, where `window` is the longest text a rule
//! can match. For phrases and for regexes with a bounded match length (`a{1,20}`,
//! `bad (word|thing)`) it is exact. A regex with an unbounded length (`a+`, `.*`) counts
//! as [`PolicyRules::regex_window`] bytes (default [`DEFAULT_REGEX_WINDOW`]): a match
//! longer than that may be missed if its beginning was already released. Empty matches
//! never count. Anchors (`^`, `$`, `\b`) see only the text not yet released.

use std::ops::Range;

use regex::Regex;

use crate::error::{ApiError, ErrorKind};

/// Hold-back, in bytes, assumed for a regex whose matches have no length bound.
pub const DEFAULT_REGEX_WINDOW: usize = 256;

/// Why a rule set could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy phrase #{index} is empty")]
    EmptyPhrase { index: usize },
    #[error("policy regex #{index} `{pattern}` is invalid: {source}")]
    InvalidRegex { index: usize, pattern: String, source: Box<regex::Error> },
    #[error("policy regex window must be at least 1 byte")]
    ZeroWindow,
}

/// A compiled set of literal phrases and regexes.
#[derive(Clone, Debug)]
pub struct PolicyRules {
    /// All rules as one leftmost-first alternation; `None` when there are no rules.
    matcher: Option<Regex>,
    /// The longest text (bytes) any rule is guaranteed to be caught at.
    window: usize,
    regex_window: usize,
}

impl PolicyRules {
    /// Compiles `phrases` (matched case-insensitively, as plain text) and `regexes`
    /// (Rust `regex` syntax), with the default window for unbounded regexes.
    pub fn new(phrases: &[String], regexes: &[String]) -> Result<Self, PolicyError> {
        Self::with_regex_window(phrases, regexes, DEFAULT_REGEX_WINDOW)
    }

    /// As [`PolicyRules::new`], with `regex_window` bytes assumed for unbounded regexes.
    pub fn with_regex_window(phrases: &[String], regexes: &[String], regex_window: usize) -> Result<Self, PolicyError> {
        if regex_window == 0 {
            return Err(PolicyError::ZeroWindow);
        }
        let mut parts = Vec::with_capacity(phrases.len() + regexes.len());
        let mut window = 0;
        for (index, phrase) in phrases.iter().enumerate() {
            if phrase.is_empty() {
                return Err(PolicyError::EmptyPhrase { index });
            }
            let part = format!("(?i:{})", regex::escape(phrase));
            window = window.max(max_match_len(&part).unwrap_or(regex_window));
            parts.push(part);
        }
        for (index, pattern) in regexes.iter().enumerate() {
            let invalid = |e| PolicyError::InvalidRegex { index, pattern: pattern.clone(), source: Box::new(e) };
            Regex::new(pattern).map_err(invalid)?;
            window = window.max(max_match_len(pattern).unwrap_or(regex_window));
            parts.push(format!("(?:{pattern})"));
        }
        let matcher = if parts.is_empty() {
            None
        } else {
            let joined = parts.join("|");
            let invalid = |e| PolicyError::InvalidRegex { index: 0, pattern: joined.clone(), source: Box::new(e) };
            Some(Regex::new(&joined).map_err(invalid)?)
        };
        Ok(PolicyRules { matcher, window, regex_window })
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// The longest match (bytes) output matching is guaranteed to catch.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The window assumed for regexes with unbounded matches.
    pub fn regex_window(&self) -> usize {
        self.regex_window
    }

    /// The byte range of the leftmost non-empty match in `text`.
    pub fn find(&self, text: &str) -> Option<Range<usize>> {
        let matcher = self.matcher.as_ref()?;
        matcher.find_iter(text).find(|m| !m.is_empty()).map(|m| m.range())
    }

    /// Refuses a prompt that matches any rule (400, type `content_policy`). The message
    /// does not quote the rule, so clients cannot probe the rule list.
    pub fn check_input(&self, text: &str) -> Result<(), ApiError> {
        match self.find(text) {
            None => Ok(()),
            Some(_) => Err(ApiError::new(ErrorKind::ContentPolicy, "the prompt was refused by the content policy")
                .with_param("prompt")),
        }
    }
}

/// The longest text (bytes) `pattern` can match, when bounded.
fn max_match_len(pattern: &str) -> Option<usize> {
    regex_syntax::parse(pattern).ok()?.properties().maximum_len()
}

//! Reading a server-sent-events stream as a client (`starling chat --url`, `bench --http`):
//! body frames are split into events at blank lines, and each event is decoded as UTF-8
//! only once it is whole, so a character the network split across two frames arrives
//! intact instead of as two replacement characters.

/// Bytes received and not yet part of a whole event.
#[derive(Debug, Default)]
pub struct SseEvents {
    pending: Vec<u8>,
}

impl SseEvents {
    /// Adds one body frame; returns the events it completed, each with its trailing blank
    /// line removed (`\n\n` or `\r\n\r\n`).
    pub fn push(&mut self, frame: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(frame);
        let mut events = Vec::new();
        while let Some((end, gap)) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end + gap).take(end).collect();
            events
                .push(String::from_utf8(event).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()));
        }
        events
    }
}

/// Where the first event in `bytes` ends, and the length of the blank line that ends it.
fn event_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The `event:` name of one event, if it has one.
pub fn event_name(event: &str) -> Option<&str> {
    event.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim)
}

/// The `data:` lines of one event, joined with newlines as SSE defines.
pub fn event_data(event: &str) -> Option<String> {
    let lines: Vec<&str> =
        event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: token\ndata: {\"text\":\"h\u{e9}llo \u{1f426}\"}\n\nevent: done\r\ndata: {}\r\n\r\n";

    #[test]
    fn a_split_at_every_byte_gives_the_same_events() {
        let whole = SseEvents::default().push(STREAM.as_bytes());
        assert_eq!(whole.len(), 2);
        assert_eq!(event_name(&whole[0]), Some("token"));
        assert_eq!(event_data(&whole[0]).as_deref(), Some("{\"text\":\"h\u{e9}llo \u{1f426}\"}"));
        assert_eq!(event_name(&whole[1]), Some("done"));
        for cut in 0..=STREAM.len() {
            let mut events = SseEvents::default();
            let mut got = events.push(&STREAM.as_bytes()[..cut]);
            got.extend(events.push(&STREAM.as_bytes()[cut..]));
            assert_eq!(got, whole, "split at byte {cut}");
        }
    }

    #[test]
    fn an_unfinished_event_waits_for_its_blank_line() {
        let mut events = SseEvents::default();
        assert!(events.push(b"data: [DONE]\n").is_empty());
        assert_eq!(events.push(b"\n"), ["data: [DONE]"]);
        assert_eq!(event_name("data: x"), None);
        assert_eq!(event_data("event: x"), None);
    }
}

//! A Server-Sent Events parser (the WHATWG `text/event-stream` format), fed chunks as they arrive
//! from the network: lines may end in LF, CRLF or CR and may be split anywhere between chunks.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id seen so far (ids persist across events, as the format says).
    pub id: Option<String>,
    /// `message` unless the event named its type.
    pub event: String,
    /// The `data` lines, joined with `\n`.
    pub data: String,
}

/// Incremental parser. Each event carries the last id seen, for a reconnect's `Last-Event-ID`.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet ended.
    pending: Vec<u8>,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a chunk and returns the events it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.pending.len() {
            let end = match self.pending[i] {
                b'\n' => 1,
                // A CR at the chunk's end may be the first half of a CRLF: wait for the next byte.
                b'\r' if i + 1 == self.pending.len() => break,
                b'\r' if self.pending[i + 1] == b'\n' => 2,
                b'\r' => 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let line = String::from_utf8_lossy(&self.pending[start..i]).into_owned();
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
            i += end;
            start = i;
        }
        self.pending.drain(..start);
        events
    }

    fn line(&mut self, mut line: &str) -> Option<SseEvent> {
        if !self.started {
            self.started = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_string(),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            _ => {} // `retry` and unknown fields
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            id: self.last_id.clone(),
            event: if event.is_empty() { "message".into() } else { event },
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: Option<&str>, event: &str, data: &str) -> SseEvent {
        SseEvent { id: id.map(Into::into), event: event.into(), data: data.into() }
    }

    #[test]
    fn parses_events_with_ids_types_and_multi_line_data() {
        let mut p = SseParser::new();
        let got = p.feed(b": hello\nid: 1\nevent: state\ndata: {\"a\":1}\n\ndata: x\ndata:y\n\n");
        assert_eq!(got, vec![ev(Some("1"), "state", "{\"a\":1}"), ev(Some("1"), "message", "x\ny")]);
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_events() {
        let stream = b"\xef\xbb\xbfid: 7\r\nevent: state\r\ndata: one\r\n\r\nid: 8\rdata: two\r\rdata: \xc3\xa9\n\n";
        let whole = SseParser::new().feed(stream);
        assert_eq!(
            whole,
            vec![ev(Some("7"), "state", "one"), ev(Some("8"), "message", "two"), ev(Some("8"), "message", "é")]
        );
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let mut p = SseParser::new();
                let mut got = p.feed(&stream[..cut]);
                got.extend(p.feed(&stream[cut..cut2]));
                got.extend(p.feed(&stream[cut2..]));
                assert_eq!(got, whole, "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched_and_empty_ones_are_dropped() {
        let mut p = SseParser::new();
        assert_eq!(p.feed(b"id: 3\nevent: state\n\n"), vec![]);
        assert_eq!(p.feed(b"event: x\ndata: half"), vec![]);
        assert_eq!(p.feed(b"\n"), vec![]);
        assert_eq!(p.feed(b"\n"), vec![ev(Some("3"), "x", "half")]);
    }

    #[test]
    fn fields_without_a_space_or_a_colon_follow_the_format() {
        let mut p = SseParser::new();
        assert_eq!(p.feed(b"data\nretry: 100\nid:9\nbogus: 1\n\n"), vec![ev(Some("9"), "message", "")]);
        assert_eq!(p.feed(b"id: a\0b\ndata: z\n\n"), vec![ev(Some("9"), "message", "z")]);
    }
}

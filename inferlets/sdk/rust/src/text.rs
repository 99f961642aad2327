//! Turning generated tokens into text as they arrive.
//!
//! A byte-level tokenizer splits multi-byte UTF-8 characters across tokens, so a token's bytes
//! alone are not always text. [`Utf8Stream`] holds back an incomplete character until the next
//! bytes complete it. [`StopScanner`] holds back text that might be the start of a stop string,
//! so what was streamed never has to be taken back.

/// Incremental UTF-8 decoding: complete characters out, an incomplete tail kept for later.
/// Invalid bytes become U+FFFD, as the host's decoder does.
#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    tail: Vec<u8>,
}

impl Utf8Stream {
    pub fn new() -> Utf8Stream {
        Utf8Stream::default()
    }

    /// The text that `bytes` complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.tail.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.tail) {
                Ok(text) => {
                    out.push_str(text);
                    self.tail.clear();
                    return out;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.tail[..valid]).expect("valid prefix"));
                    match err.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.tail.drain(..valid + bad);
                        }
                        None => {
                            // An incomplete character at the end: wait for its other bytes.
                            self.tail.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// The end of the stream: whatever is left, with an incomplete character replaced.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.tail).into_owned();
        self.tail.clear();
        out
    }
}

/// Finds stop strings in streamed text, releasing only text that cannot be part of one.
#[derive(Clone, Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    text: String,
    released: usize,
}

impl StopScanner {
    pub fn new(stops: &[String]) -> StopScanner {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        StopScanner { stops, text: String::new(), released: 0 }
    }

    /// Add text; returns the text now safe to release and the stop string, if one appeared
    /// (the released text then ends right before it).
    pub fn push(&mut self, chunk: &str) -> (String, Option<String>) {
        self.text.push_str(chunk);
        // A match cannot start in released text: the released part never ends with the start
        // of a stop string (that part is held back), and complete matches were caught before.
        if let Some((at, stop)) = self.earliest_stop(self.released) {
            let released = self.text[self.released..at].to_string();
            self.released = self.text.len();
            return (released, Some(stop));
        }
        let safe_end = self.text.len() - self.held_back();
        let released = self.text[self.released..safe_end.max(self.released)].to_string();
        self.released = safe_end.max(self.released);
        (released, None)
    }

    /// Release everything still held back (the generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        rest
    }

    fn earliest_stop(&self, from: usize) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|stop| self.text[from..].find(stop.as_str()).map(|i| (from + i, stop)))
            .min_by_key(|(at, _)| *at)
            .map(|(at, stop)| (at, stop.clone()))
    }

    /// The length of the longest end of the text that begins some stop string.
    fn held_back(&self) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > held && self.text.ends_with(&stop[..k]) {
                    held = k;
                }
            }
        }
        held
    }
}

/// Text of generated tokens from their bytes, with stop strings held back.
pub struct TokenText {
    utf8: Utf8Stream,
    scanner: StopScanner,
}

impl TokenText {
    pub fn new(stop_strings: &[String]) -> TokenText {
        TokenText { utf8: Utf8Stream::new(), scanner: StopScanner::new(stop_strings) }
    }

    /// The text released by one more token's bytes (from the forward's `token_bytes`, or
    /// [`Vocab::bytes`](crate::tokenizer::Vocab::bytes)), and the stop string it completed.
    pub fn push(&mut self, bytes: &[u8]) -> (String, Option<String>) {
        let chunk = self.utf8.push(bytes);
        self.scanner.push(&chunk)
    }

    /// Everything still held back, at the end of the generation.
    pub fn finish(&mut self) -> String {
        let tail = self.utf8.finish();
        let (mut out, _) = self.scanner.push(&tail);
        out.push_str(&self.scanner.finish());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens() {
        let mut stream = Utf8Stream::new();
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(stream.push(b"a"), "a");
        assert_eq!(stream.push(&euro[..1]), "");
        assert_eq!(stream.push(&euro[1..2]), "");
        assert_eq!(stream.push(&[euro[2], b'b']), "€b");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(&[b'x', 0xff, b'y']), "x\u{FFFD}y");
        assert_eq!(stream.push(&[0xe2, 0x82]), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut scanner = StopScanner::new(&["\n\nUser:".to_string()]);
        assert_eq!(scanner.push("Hello"), ("Hello".to_string(), None));
        assert_eq!(scanner.push(" world\n"), (" world".to_string(), None));
        assert_eq!(scanner.push("\nUs"), (String::new(), None));
        assert_eq!(scanner.push("er: hi"), (String::new(), Some("\n\nUser:".to_string())));
    }

    #[test]
    fn false_alarm_is_released() {
        let mut scanner = StopScanner::new(&["END".to_string()]);
        assert_eq!(scanner.push("the EN"), ("the ".to_string(), None));
        assert_eq!(scanner.push("D"), (String::new(), Some("END".to_string())));
        let mut scanner = StopScanner::new(&["END".to_string()]);
        assert_eq!(scanner.push("EN"), (String::new(), None));
        assert_eq!(scanner.push("Dless"), (String::new(), Some("END".to_string())));
        let mut scanner = StopScanner::new(&["END".to_string()]);
        assert_eq!(scanner.push("EN"), (String::new(), None));
        assert_eq!(scanner.push("x"), ("ENx".to_string(), None));
        assert_eq!(scanner.push("E"), (String::new(), None));
        assert_eq!(scanner.finish(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        let mut scanner = StopScanner::new(&["ü!".to_string(), "b".to_string()]);
        assert_eq!(scanner.push("aü"), ("a".to_string(), None));
        assert_eq!(scanner.push("!b"), (String::new(), Some("ü!".to_string())));
        let mut plain = StopScanner::new(&[]);
        assert_eq!(plain.push("ünïcode"), ("ünïcode".to_string(), None));
    }

    #[test]
    fn only_text_that_cannot_begin_a_stop_string_is_released() {
        let cases: [(&str, &[&str], &str, Option<&str>, &str); 5] = [
            ("hello world", &[], "hello world", None, ""),
            ("hello world", &["lo w"], "hel", Some("lo w"), ""),
            ("hello wo", &["world"], "hello ", None, "wo"), // "wo" may still become "world"
            ("abc", &["x", "bc"], "a", Some("bc"), ""),
            ("ab", &["bcd", "abz"], "", None, "ab"),
        ];
        for (text, stops, released, stop, held) in cases {
            let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            let mut scanner = StopScanner::new(&stops);
            let pushed = scanner.push(text);
            assert_eq!(pushed, (released.to_string(), stop.map(str::to_string)), "{:?}", text);
            if stop.is_none() {
                assert_eq!(scanner.finish(), held, "{:?}", text);
            }
        }
    }

    #[test]
    fn token_text_streams_token_bytes() {
        let euro = "€".as_bytes();
        let mut text = TokenText::new(&["<st".to_string()]);
        assert_eq!(text.push(b"Hi"), ("Hi".to_string(), None));
        assert_eq!(text.push(&[b' ', euro[0]]), (" ".to_string(), None));
        assert_eq!(text.push(&euro[1..]), ("€".to_string(), None));
        assert_eq!(text.push(b"<stop>"), (String::new(), Some("<st".to_string())));
    }
}

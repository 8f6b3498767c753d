//! Stop strings over streamed text.
//!
//! Text arrives a token at a time. A stop string can span several tokens, so any tail of the text
//! that could still grow into a stop string is held back until it either completes one (the
//! output ends there, the stop string itself left out unless asked for) or stops matching (the
//! text is released). So a streamed stop string never leaks to the client.

pub struct StopStrings {
    stops: Vec<String>,
    include_in_output: bool,
    /// All text so far (after a match, cut at the stop).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    longest: usize,
}

/// What one piece of text did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StopCheck {
    /// Text that is now final.
    pub released: String,
    /// The stop string that matched, ending the output.
    pub matched: Option<String>,
}

impl StopStrings {
    pub fn new(stops: Vec<String>, include_in_output: bool) -> StopStrings {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        StopStrings { stops, include_in_output, text: String::new(), released: 0, longest }
    }

    /// Adds text; with `check` false (before `min_tokens`), stop strings are not looked for and
    /// nothing is held back.
    pub fn push(&mut self, new_text: &str, check: bool) -> StopCheck {
        // A match must end in the new text, so it starts at most `longest - 1` bytes before it.
        let mut search_from = self.text.len().saturating_sub(self.longest.saturating_sub(1)).max(self.released);
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        self.text.push_str(new_text);
        if !check || self.stops.is_empty() {
            return StopCheck { released: self.release(self.text.len()), matched: None };
        }
        let window = &self.text[search_from..];
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| window.find(s.as_str()).map(|at| (search_from + at, s)))
            .min_by_key(|(at, s)| (*at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = first_match {
            let stop = stop.clone();
            let end = if self.include_in_output { at + stop.len() } else { at };
            let released = self.release(end);
            self.text.truncate(end);
            return StopCheck { released, matched: Some(stop) };
        }
        let held = self.partial_match_len();
        StopCheck { released: self.release(self.text.len() - held), matched: None }
    }

    /// Releases whatever was held back: the output ended without completing a stop string.
    pub fn flush(&mut self) -> String {
        self.release(self.text.len())
    }

    /// The whole output text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the longest tail of the text that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > held && self.text.ends_with(&stop[..k]) {
                    held = k;
                }
            }
        }
        held.min(self.text.len() - self.released)
    }

    fn release(&mut self, end: usize) -> String {
        if end <= self.released {
            return String::new();
        }
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], include: bool, pieces: &[&str]) -> (Vec<String>, Option<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = Vec::new();
        for p in pieces {
            let check = s.push(p, true);
            out.push(check.released);
            if check.matched.is_some() {
                return (out, check.matched);
            }
        }
        out.push(s.flush());
        (out, None)
    }

    #[test]
    fn a_stop_string_split_across_pieces_never_leaks() {
        let (out, matched) = run(&["STOP"], false, &["Hello S", "TO", "P world"]);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert_eq!(matched.as_deref(), Some("STOP"));
        let (out, _) = run(&["STOP"], true, &["Hello S", "TO", "P world"]);
        assert_eq!(out.concat(), "Hello STOP");
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching_or_the_output_ends() {
        let (out, matched) = run(&["STOP"], false, &["a ST", "x", " b S"]);
        assert_eq!(out, vec!["a ", "STx", " b ", "S"]);
        assert_eq!(matched, None);
    }

    #[test]
    fn the_earliest_match_wins_and_multibyte_text_is_cut_on_boundaries() {
        let (out, matched) = run(&["é!", "b"], false, &["aé", "!b"]);
        assert_eq!(out.concat(), "a");
        assert_eq!(matched.as_deref(), Some("é!"));
    }

    #[test]
    fn before_min_tokens_nothing_is_checked() {
        let mut s = StopStrings::new(vec!["x".into()], false);
        assert_eq!(s.push("axb", false), StopCheck { released: "axb".into(), matched: None });
        assert_eq!(s.push("x", true).matched.as_deref(), Some("x"));
        assert_eq!(s.text(), "axb");
    }
}

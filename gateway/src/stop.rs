//! Stop strings, matched on the generated text as it streams.
//!
//! Text that could still become a stop string is held back until it is decided; text at or
//! after a match is never released. A match is the first stop string to *end* in the text
//! (ties: the longest), so the result does not depend on how the text was cut into deltas.

/// What a delta releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Text that can no longer be part of a stop string (possibly empty).
    Text(String),
    /// A stop string matched: the text before it, and the stop string.
    Stop {
        /// Text before the match, not released before.
        text: String,
        /// The stop string that matched.
        matched: String,
    },
}

/// Per-stream stop-string state.
///
/// Text that could still become a stop string is held back; a stop string split over deltas
/// is found all the same, and neither it nor anything after it is released:
///
/// ```
/// use llorch_gateway::stop::{Released, StopMatcher};
///
/// let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
/// assert_eq!(m.push("Hello EN"), Released::Text("Hello ".into())); // "EN" may become "END"
/// assert_eq!(m.push("ough\n"), Released::Text("ENough".into())); // it did not; "\n" held
/// assert_eq!(
///     m.push("\nmore"),
///     Released::Stop { text: String::new(), matched: "\n\n".into() }
/// );
///
/// // Without a match, finish() releases what was held.
/// let mut m = StopMatcher::new(vec!["END".into()]);
/// assert_eq!(m.push("the E"), Released::Text("the ".into()));
/// assert_eq!(m.finish(), "E");
/// ```
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text; returns what may be shown now.
    pub fn push(&mut self, delta: &str) -> Released {
        if self.stops.is_empty() {
            return Released::Text(delta.to_owned());
        }
        let searched_from = self.pending.len();
        self.pending.push_str(delta);
        if let Some((start, stop)) = self.first_match(searched_from) {
            let text = self.pending[..start].to_owned();
            self.pending.clear();
            return Released::Stop { text, matched: stop };
        }
        let hold = self.held_suffix();
        let release = self.pending.len() - hold;
        let text = self.pending[..release].to_owned();
        self.pending.drain(..release);
        Released::Text(text)
    }

    /// Releases whatever is held back (the stream ended without a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// The match that ends first in `pending` (ties: the longest); only matches ending after
    /// byte `searched_from` are new.
    fn first_match(&self, searched_from: usize) -> Option<(usize, String)> {
        let mut best: Option<(usize, usize, &String)> = None; // (end, start, stop)
        for stop in &self.stops {
            // The earliest occurrence that ends after what was already searched.
            let from = searched_from.saturating_sub(stop.len() - 1);
            let from = (from..=self.pending.len())
                .find(|&i| self.pending.is_char_boundary(i))
                .unwrap_or(self.pending.len());
            if let Some(pos) = self.pending[from..].find(stop.as_str()) {
                let (start, end) = (from + pos, from + pos + stop.len());
                if best.is_none_or(|(e, s, _)| end < e || (end == e && start < s)) {
                    best = Some((end, start, stop));
                }
            }
        }
        best.map(|(_, start, stop)| (start, stop.clone()))
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for k in (hold + 1..stop.len()).rev() {
                if stop.is_char_boundary(k) && self.pending.ends_with(&stop[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Feeds `deltas` and returns (released text, matched stop).
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                Released::Text(t) => out.push_str(&t),
                Released::Stop { text, matched } => {
                    out.push_str(&text);
                    return (out, Some(matched));
                }
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    /// The reference: the first stop to end in the full text (ties: longest).
    fn reference(stops: &[String], text: &str) -> (String, Option<String>) {
        for end in 1..=text.len() {
            if !text.is_char_boundary(end) {
                continue;
            }
            let mut found: Option<&String> = None;
            for s in stops.iter().filter(|s| !s.is_empty()) {
                if text[..end].ends_with(s.as_str()) && found.is_none_or(|f| s.len() > f.len()) {
                    found = Some(s);
                }
            }
            if let Some(s) = found {
                return (text[..end - s.len()].to_owned(), Some(s.clone()));
            }
        }
        (text.to_owned(), None)
    }

    #[test]
    fn a_stop_string_spanning_deltas_is_never_released() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", " there\n", "\nUs", "er:", " more"]),
            ("Hi there".into(), Some("\n\nUser:".into()))
        );
    }

    #[test]
    fn a_possible_prefix_is_held_then_released_when_it_turns_out_not_to_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the E"), Released::Text("the ".into()));
        assert_eq!(m.push("N"), Released::Text(String::new()));
        assert_eq!(m.push("D"), Released::Stop { text: String::new(), matched: "END".into() });
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN"), Released::Text("the ".into()));
        assert_eq!(m.push("ough"), Released::Text("ENough".into()));
    }

    #[test]
    fn the_first_stop_to_end_wins() {
        assert_eq!(run(&["abcd", "c"], &["abcd"]), ("ab".into(), Some("c".into())));
        assert_eq!(run(&["bc", "abc"], &["xabc"]), ("x".into(), Some("abc".into())));
    }

    #[test]
    fn multibyte_stop_strings_and_text() {
        assert_eq!(
            run(&["日本"], &["こんにちは日", "本語"]),
            ("こんにちは".into(), Some("日本".into()))
        );
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), None));
    }

    proptest! {
        #[test]
        fn nothing_at_or_after_a_match_is_released_and_nothing_before_it_is_lost(
            text in "[ab é日\n]{0,40}",
            stops in prop::collection::vec("[ab é日\n]{1,4}", 0..4),
            cuts in prop::collection::vec(0usize..8, 1..20),
        ) {
            // Cut the text into deltas on character boundaries.
            let chars: Vec<char> = text.chars().collect();
            let mut deltas = Vec::new();
            let mut i = 0;
            for c in cuts.iter().cycle().take(chars.len() + 1) {
                if i >= chars.len() { break; }
                let n = (*c).max(1).min(chars.len() - i);
                deltas.push(chars[i..i + n].iter().collect::<String>());
                i += n;
            }
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let delta_refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
            prop_assert_eq!(run(&stop_refs, &delta_refs), reference(&stops, &text));
        }
    }
}

//! The drafter: prompt lookup. The last n tokens of the sequence (n from the longest n-gram
//! down to one) are looked up in the sequence itself; the tokens that followed their most
//! recent earlier occurrence are the draft. It costs no model at all and drafts well wherever
//! the output copies its input: quoting, editing, code, repeated structure.

/// Up to `max_len` drafted tokens continuing `history`, matching n-grams of at most
/// `max_ngram` tokens; empty when no suffix of `history` occurred before.
pub fn draft(history: &[u32], max_ngram: usize, max_len: usize) -> Vec<u32> {
    if max_len == 0 {
        return Vec::new();
    }
    for n in (1..=max_ngram.min(history.len().saturating_sub(1))).rev() {
        let tail = &history[history.len() - n..];
        // Earlier occurrences only: a match at `start` must end before the tail begins to
        // leave at least one token after it.
        let found = (0..history.len() - n).rev().find(|&start| &history[start..start + n] == tail);
        if let Some(start) = found {
            let from = start + n;
            let to = (from + max_len).min(history.len());
            return history[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::draft;

    #[test]
    fn copies_what_followed_the_latest_match() {
        // ... 1 2 3 4 5 ... 1 2 | -> 3 4 5
        assert_eq!(draft(&[1, 2, 3, 4, 5, 9, 1, 2], 3, 3), vec![3, 4, 5]);
        // The most recent occurrence wins.
        assert_eq!(draft(&[7, 1, 6, 7, 1, 8, 7, 1], 2, 1), vec![8]);
    }

    #[test]
    fn prefers_longer_ngrams() {
        // "2" alone last continued with 8, but "1 2" continued with 3.
        assert_eq!(draft(&[1, 2, 3, 5, 2, 8, 1, 2], 2, 1), vec![3]);
    }

    #[test]
    fn stops_at_the_end_and_on_no_match() {
        assert_eq!(draft(&[1, 2, 1], 3, 5), vec![2, 1]);
        assert!(draft(&[1, 2, 3], 3, 5).is_empty());
        assert!(draft(&[], 3, 5).is_empty());
        assert!(draft(&[1, 1], 3, 0).is_empty());
    }
}

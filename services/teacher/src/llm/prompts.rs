//! What is sent to an LLM re-ranker and how its answers are read: RankGPT's listwise prompt and
//! permutation repair, sliding windows, and the pointwise yes/no prompt with P("yes") from logprobs.
//! Pure functions of text and JSON; the client (`client.rs`) does the I/O.

use serde_json::{json, Value};

/// `text` cut to its first `max_words` whitespace-separated words (joined by single spaces).
pub fn truncate_words(text: &str, max_words: usize) -> String {
    text.split_whitespace().take(max_words).collect::<Vec<_>>().join(" ")
}

/// RankGPT's conversation (Sun et al., 2023): numbered passages, one per turn, then the instruction
/// to answer with identifiers only. Mirrors `create_permutation_instruction` of the RankGPT code.
pub fn listwise_messages(query: &str, passages: &[String]) -> Value {
    let n = passages.len();
    let mut messages = vec![
        json!({"role": "system", "content": "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."}),
        json!({"role": "user", "content": format!("I will provide you with {n} passages, each indicated by number identifier []. \nRank the passages based on their relevance to query: {query}.")}),
        json!({"role": "assistant", "content": "Okay, please provide the passages."}),
    ];
    for (i, p) in passages.iter().enumerate() {
        messages.push(json!({"role": "user", "content": format!("[{}] {p}", i + 1)}));
        messages.push(json!({"role": "assistant", "content": format!("Received passage [{}].", i + 1)}));
    }
    messages.push(json!({"role": "user", "content": format!(
        "Search Query: {query}. \nRank the {n} passages above based on their relevance to the search query. \
         The passages should be listed in descending order using identifiers. The most relevant passages should be \
         listed first. The output format should be [] > [], e.g., [1] > [2]. Only response the ranking results, do \
         not say any word or explain."
    )}));
    Value::Array(messages)
}

/// A permutation read from an answer: `order[k]` is the window position (0-based) ranked k-th.
#[derive(Debug, Clone, PartialEq)]
pub struct Permutation {
    pub order: Vec<usize>,
    /// Ids the answer repeated or that were out of range (dropped).
    pub dropped: usize,
    /// Window positions the answer left out (appended in their original order).
    pub appended: usize,
}

impl Permutation {
    pub fn repaired(&self) -> bool {
        self.dropped > 0 || self.appended > 0
    }
}

/// Reads a ranking answer like `[2] > [3] > [1]` over `n` passages: every number in the text is an
/// identifier (1-based; RankGPT's `clean_response`), duplicates and unknown ids are dropped, missing
/// ones appended in their original order. None when the answer names no valid id at all.
pub fn parse_permutation(answer: &str, n: usize) -> Option<Permutation> {
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut dropped = 0;
    for token in answer.split(|c: char| !c.is_ascii_digit()).filter(|t| !t.is_empty()) {
        match token.parse::<usize>() {
            Ok(id) if (1..=n).contains(&id) && !seen[id - 1] => {
                seen[id - 1] = true;
                order.push(id - 1);
            }
            _ => dropped += 1,
        }
    }
    if order.is_empty() {
        return None;
    }
    let missing: Vec<usize> = (0..n).filter(|i| !seen[*i]).collect();
    let appended = missing.len();
    order.extend(missing);
    Some(Permutation { order, dropped, appended })
}

/// The windows `[start, end)` a sliding pass re-ranks over a list of `n`, in the order they run:
/// from the bottom of the list to the top, each `stride` higher than the last, the last one at the
/// top. One window when `n <= size`.
pub fn windows(n: usize, size: usize, stride: usize) -> Vec<(usize, usize)> {
    let size = size.max(1);
    let stride = stride.clamp(1, size);
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut end = n;
    loop {
        let start = end.saturating_sub(size);
        out.push((start, end));
        if start == 0 {
            return out;
        }
        end -= stride;
    }
}

/// The pointwise question (one passage, answer yes or no).
pub fn pointwise_prompt(query: &str, passage: &str) -> String {
    format!("Passage: {passage}\nQuery: {query}\nDoes the passage answer the query? Answer 'Yes' or 'No'.\nAnswer:")
}

/// The pointwise system message.
pub const POINTWISE_SYSTEM: &str = "You are a search relevance judge. Answer with one word: Yes or No.";

pub fn pointwise_messages(query: &str, passage: &str) -> Value {
    json!([
        {"role": "system", "content": POINTWISE_SYSTEM},
        {"role": "user", "content": pointwise_prompt(query, passage)},
    ])
}

/// P("yes") from first-token candidates `(token, logprob)`: the tokens that read "yes" or "no" once
/// trimmed and lower-cased are summed in probability, and the score is P(yes) / (P(yes) + P(no)).
/// None when neither appears.
pub fn yes_probability<'a>(candidates: impl IntoIterator<Item = (&'a str, f64)>) -> Option<f64> {
    let (mut yes, mut no) = (0.0f64, 0.0f64);
    let mut any = false;
    for (token, logprob) in candidates {
        match token.trim().to_lowercase().as_str() {
            "yes" => {
                yes += logprob.exp();
                any = true;
            }
            "no" => {
                no += logprob.exp();
                any = true;
            }
            _ => {}
        }
    }
    (any && yes + no > 0.0).then(|| yes / (yes + no))
}

/// First-token candidates of a chat answer (`choices[0].logprobs.content[0].top_logprobs`, with the
/// sampled token itself) or of a completions answer (`choices[0].logprobs.top_logprobs[0]`, a map).
pub fn first_token_logprobs(response: &Value) -> Vec<(String, f64)> {
    let lp = &response["choices"][0]["logprobs"];
    let mut out = Vec::new();
    if let Some(first) = lp["content"].get(0) {
        if let (Some(t), Some(l)) = (first["token"].as_str(), first["logprob"].as_f64()) {
            out.push((t.to_string(), l));
        }
        for c in first["top_logprobs"].as_array().into_iter().flatten() {
            if let (Some(t), Some(l)) = (c["token"].as_str(), c["logprob"].as_f64()) {
                out.push((t.to_string(), l));
            }
        }
    } else if let Some(map) = lp["top_logprobs"].get(0).and_then(Value::as_object) {
        out.extend(map.iter().filter_map(|(t, l)| Some((t.clone(), l.as_f64()?))));
    }
    // The sampled token may also be among the top candidates: count each token once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(t, _)| seen.insert(t.clone()));
    out
}

/// The text of the first choice (chat `message.content` or completions `text`).
pub fn answer_text(response: &Value) -> Option<&str> {
    let choice = &response["choices"][0];
    choice["message"]["content"].as_str().or_else(|| choice["text"].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_repaired() {
        let p = parse_permutation("[2] > [3] > [1]", 3).unwrap();
        assert_eq!(p.order, vec![1, 2, 0]);
        assert!(!p.repaired());
        // Duplicates and unknown ids dropped, missing ids appended in original order.
        let p = parse_permutation("[3] > [3] > [9] > [1]", 5).unwrap();
        assert_eq!(p.order, vec![2, 0, 1, 3, 4]);
        assert_eq!((p.dropped, p.appended), (2, 3));
        // Prose around the ids is ignored, as RankGPT's clean_response does.
        assert_eq!(parse_permutation("Ranking: 2 > 1.", 2).unwrap().order, vec![1, 0]);
        assert_eq!(parse_permutation("I cannot rank these passages.", 4), None);
        assert_eq!(parse_permutation("[0] > [7]", 4), None);
    }

    #[test]
    fn sliding_windows_go_bottom_up() {
        assert_eq!(windows(100, 20, 10).first(), Some(&(80, 100)));
        assert_eq!(windows(100, 20, 10).last(), Some(&(0, 20)));
        assert_eq!(windows(100, 20, 10).len(), 9);
        assert_eq!(windows(15, 20, 10), vec![(0, 15)]);
        assert_eq!(windows(30, 20, 10), vec![(10, 30), (0, 20)]);
        assert_eq!(windows(25, 20, 10), vec![(5, 25), (0, 15)]);
        assert!(windows(0, 20, 10).is_empty());
    }

    #[test]
    fn yes_probability_normalises_over_yes_and_no() {
        let p = yes_probability([(" Yes", (0.6f64).ln()), ("No", (0.2f64).ln()), ("yes", (0.1f64).ln())]).unwrap();
        assert!((p - 0.7 / 0.9).abs() < 1e-12);
        assert_eq!(yes_probability([("Maybe", -0.1)]), None);
        let chat = json!({"choices": [{"logprobs": {"content": [{"token": "Yes", "logprob": -0.5,
            "top_logprobs": [{"token": "Yes", "logprob": -0.5}, {"token": "No", "logprob": -1.5}]}]}}]});
        let c = first_token_logprobs(&chat);
        assert_eq!(c.len(), 2);
        let p = yes_probability(c.iter().map(|(t, l)| (t.as_str(), *l))).unwrap();
        assert!((p - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-12);
        let completions =
            json!({"choices": [{"text": " No", "logprobs": {"top_logprobs": [{" No": -0.1, " Yes": -2.4}]}}]});
        assert_eq!(first_token_logprobs(&completions).len(), 2);
        assert_eq!(answer_text(&completions), Some(" No"));
    }

    #[test]
    fn truncation_counts_words() {
        assert_eq!(truncate_words("a  b\tc d", 3), "a b c");
        assert!(listwise_messages("q", &["x".into(), "y".into()]).as_array().unwrap().len() == 8);
    }
}

//! The text side of the recursion: the chat turns that ask a node for its sub-questions, for a
//! direct answer, and for its answer given its sub-answers (ChatML, the format `render_chat`
//! speaks), and reading the sub-questions out of the model's numbered list.

/// Closes the assistant's turn when the model did not (a stop token closes it already).
pub const END_OF_TURN: &str = "<|im_end|>";

/// What a node that may recurse is asked first: its question, and its sub-questions only.
pub fn plan_request(question: &str, limit: usize) -> String {
    format!(
        "{}\nDo not answer yet. First list at most {} simpler sub-questions whose answers would \
         help, as a numbered list, a few words each.",
        question, limit
    )
}

/// What a node at the depth limit is asked: its question, answered directly.
pub fn answer_request(question: &str) -> String {
    format!("{}\nAnswer briefly.", question)
}

/// What a node that recursed is asked once its sub-questions are answered.
pub fn answer_with(sub_answers: &[(String, String)]) -> String {
    let mut text = String::new();
    if !sub_answers.is_empty() {
        text.push_str("Answers to the sub-questions:\n");
    }
    for (i, (question, answer)) in sub_answers.iter().enumerate() {
        text.push_str(&format!("{}. {} {}\n", i + 1, question, answer.trim()));
    }
    text.push_str("Now answer the original question.");
    text
}

/// A user turn that follows a closed assistant turn, opening the assistant's next one.
pub fn user_turn(text: &str) -> String {
    format!("\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", text)
}

/// The sub-questions as the assistant's list would read.
pub fn numbered_list(items: &[String]) -> String {
    let lines: Vec<String> =
        items.iter().enumerate().map(|(i, item)| format!("{}. {}", i + 1, item)).collect();
    lines.join("\n")
}

/// The items of a numbered (`1.` / `1)`) list, at most `limit`; none when there is no list.
pub fn parse_list(text: &str, limit: usize) -> Vec<String> {
    text.lines().filter_map(numbered_item).filter(|item| !item.is_empty()).take(limit).collect()
}

fn numbered_item(line: &str) -> Option<String> {
    let line = line.trim();
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    let rest = &line[digits..];
    if digits == 0 || !(rest.starts_with('.') || rest.starts_with(')')) {
        return None;
    }
    Some(rest[1..].trim().trim_matches('*').trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbered_items() {
        let text = "Sub-questions:\n1. How many ran?\n2) **How many stayed?**\n- not this\n3. x";
        assert_eq!(parse_list(text, 2), vec!["How many ran?", "How many stayed?"]);
        assert!(parse_list("no list here", 3).is_empty());
    }

    #[test]
    fn lists_round_trip() {
        let items = vec!["a b".to_string(), "c?".to_string()];
        assert_eq!(parse_list(&numbered_list(&items), 5), items);
    }
}

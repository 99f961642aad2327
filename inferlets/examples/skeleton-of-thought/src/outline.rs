//! The outline: reading the points out of the model's numbered list, and the chat turns that
//! ask for it and for each point's expansion (ChatML, the format `render_chat` speaks).

/// The points of a numbered (`1.` / `1)`) or bulleted (`-` / `*`) list, at most `limit`.
pub fn parse_points(text: &str, limit: usize) -> Vec<String> {
    let numbered: Vec<String> = text.lines().filter_map(numbered_item).collect();
    let items = if numbered.is_empty() {
        text.lines().filter_map(bulleted_item).collect()
    } else {
        numbered
    };
    items.into_iter().filter(|item| !item.is_empty()).take(limit).collect()
}

fn numbered_item(line: &str) -> Option<String> {
    let line = line.trim();
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    let rest = &line[digits..];
    if digits == 0 || !(rest.starts_with('.') || rest.starts_with(')')) {
        return None;
    }
    Some(clean(&rest[1..]))
}

fn bulleted_item(line: &str) -> Option<String> {
    let line = line.trim();
    let rest = line.strip_prefix("- ").or_else(|| line.strip_prefix("* "))?;
    Some(clean(rest))
}

/// Trim spaces and markdown emphasis around an item.
fn clean(item: &str) -> String {
    item.trim().trim_matches('*').trim().to_string()
}

/// What the user asks first: the question, and for the outline only.
pub fn outline_request(question: &str, points: usize) -> String {
    format!(
        "{}\nFirst write only a short outline: a numbered list of at most {} points, a few words \
         each.",
        question, points
    )
}

/// The outline as the assistant's answer would read, for a given list of points.
pub fn numbered_list(points: &[String]) -> String {
    let lines: Vec<String> =
        points.iter().enumerate().map(|(i, p)| format!("{}. {}", i + 1, p)).collect();
    lines.join("\n")
}

/// The turn that follows the assistant's outline (its end-of-turn token already in place) and
/// asks for point `index` (from 0).
pub fn expansion_turn(index: usize, point: &str) -> String {
    format!(
        "\n<|im_start|>user\nExpand point {}, \"{}\", in one or two sentences.<|im_end|>\n\
         <|im_start|>assistant\n",
        index + 1,
        point
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbered_points() {
        let text = "Here is an outline:\n1. Eat well\n2) **Sleep**\n\n3. Move\n4. Extra";
        assert_eq!(parse_points(text, 3), vec!["Eat well", "Sleep", "Move"]);
    }

    #[test]
    fn falls_back_to_bullets() {
        assert_eq!(parse_points("- a\n* b\nc", 5), vec!["a", "b"]);
        assert!(parse_points("no list here", 5).is_empty());
    }

    #[test]
    fn lists_round_trip() {
        let points = vec!["a".to_string(), "b c".to_string()];
        assert_eq!(parse_points(&numbered_list(&points), 5), points);
    }
}

//! Finds the line and column of a value by its path (`routes[2].upstream`).
//!
//! serde_yaml forgets positions once a document is deserialized, so validation errors are
//! collected with paths and located afterwards in one pass over the parser's events. The pass
//! only runs when there are errors to report, so a valid file costs nothing here.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// 1-based line and column of each wanted path found in `src`. `wanted` must be sorted.
pub fn locate(src: &str, wanted: &[&str]) -> HashMap<String, (usize, usize)> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let mut frames: Vec<Frame> = Vec::new();
    for event in Parser::new_from_str(src) {
        let Ok((event, span)) = event else { break };
        let at = (span.start.line(), span.start.col().saturating_add(1));
        match event {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map {
                    key: key @ None, ..
                }) = frames.last_mut()
                {
                    *key = Some(text.into_owned());
                    continue;
                }
                let path = node_path(&frames);
                record(&mut found, wanted, path, at);
                finish_node(&mut frames);
            }
            Event::Alias(_) => finish_node(&mut frames),
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if let Some(Frame::Map { key: None, .. }) = frames.last() {
                    // A complex mapping key: give it a placeholder name and descend.
                    if let Some(Frame::Map { key, .. }) = frames.last_mut() {
                        *key = Some(String::from("?"));
                    }
                }
                let path = node_path(&frames);
                record(&mut found, wanted, path.clone(), at);
                frames.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq { path, index: 0 }
                } else {
                    Frame::Map { path, key: None }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                frames.pop();
                finish_node(&mut frames);
            }
            _ => {}
        }
    }
    found
}

enum Frame {
    Seq { path: String, index: usize },
    Map { path: String, key: Option<String> },
}

/// The path of the node about to start, given the enclosing frames.
fn node_path(frames: &[Frame]) -> String {
    match frames.last() {
        None => String::new(),
        Some(Frame::Seq { path, index }) => format!("{path}[{index}]"),
        Some(Frame::Map { path, key }) => {
            let key = key.as_deref().unwrap_or("?");
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        }
    }
}

/// A node just ended: step the enclosing sequence, or ready the mapping for its next key.
fn finish_node(frames: &mut [Frame]) {
    match frames.last_mut() {
        Some(Frame::Seq { index, .. }) => *index = index.saturating_add(1),
        Some(Frame::Map { key, .. }) => *key = None,
        None => {}
    }
}

fn record(
    found: &mut HashMap<String, (usize, usize)>,
    wanted: &[&str],
    path: String,
    at: (usize, usize),
) {
    if wanted.binary_search(&path.as_str()).is_ok() {
        found.entry(path).or_insert(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_flow_values() {
        let src = "listen:\n  proxy: 1.2.3.4:80\nroutes:\n  - path_prefix: /a\n    upstream: nope\n  - {path_prefix: /b, upstream: x}\n";
        let at = locate(
            src,
            &[
                "listen.proxy",
                "missing",
                "routes[0].upstream",
                "routes[1]",
                "routes[1].upstream",
            ],
        );
        assert_eq!(at["listen.proxy"], (2, 10));
        assert_eq!(at["routes[0].upstream"], (5, 15));
        assert_eq!(at["routes[1]"], (6, 5));
        assert_eq!(at["routes[1].upstream"], (6, 33));
        assert!(!at.contains_key("missing"));
    }

    #[test]
    fn nested_sequences_are_indexed() {
        let src = "keys:\n- {\"id\":\"a\",\"scopes\":[\"read:/x\",\"bad\"]}\n";
        let at = locate(src, &["keys[0].scopes[1]"]);
        assert_eq!(at["keys[0].scopes[1]"], (2, 33));
    }
}

//! Where things are in a text document: the line and column of a byte, of the
//! first byte that is not UTF-8, and of each resource of a `DiscoveryResponse`,
//! so that an error about a resource of a file names where it is.

use std::fmt;

/// A line and column, both from 1 (the column counts characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

/// The position of byte `offset` of `bytes` (clamped to its length).
pub fn at(bytes: &[u8], offset: usize) -> Position {
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Characters, not bytes: continuation bytes of UTF-8 are not counted.
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xc0 != 0x80)
        .count()
        + 1;
    Position { line, column }
}

/// The positions of `offsets` in `bytes`, in one pass over the document when the
/// offsets ascend (a resource list's do): [`at`] for each would walk the
/// document from its start every time, which for the 30,000 resources of a
/// 15 MB file took minutes. An offset below the one before is found by [`at`].
pub fn at_each(bytes: &[u8], offsets: impl IntoIterator<Item = usize>) -> Vec<Position> {
    let (mut done, mut line, mut column) = (0, 1, 1);
    offsets
        .into_iter()
        .map(|offset| {
            let offset = offset.min(bytes.len());
            if offset < done {
                return at(bytes, offset);
            }
            for &b in &bytes[done..offset] {
                if b == b'\n' {
                    line += 1;
                    column = 1;
                } else if b & 0xc0 != 0x80 {
                    // Characters, not bytes, as in `at`.
                    column += 1;
                }
            }
            done = offset;
            Position { line, column }
        })
        .collect()
}

/// A document that is not UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not UTF-8 at {at} (byte {byte})")]
pub struct NotUtf8 {
    pub at: Position,
    pub byte: usize,
}

/// `bytes` as text, or where the first byte that is not UTF-8 is.
pub fn utf8(bytes: &[u8]) -> Result<&str, NotUtf8> {
    std::str::from_utf8(bytes).map_err(|e| NotUtf8 {
        at: at(bytes, e.valid_up_to()),
        byte: e.valid_up_to(),
    })
}

/// Where each element of the top-level `resources` list of a JSON document
/// starts, in order: `None` when the document does not read as one object with
/// one `resources` list.
pub fn json_resources(text: &str) -> Option<Vec<Position>> {
    let offsets = super::filedoc::resource_offsets(text)?;
    Some(at_each(text.as_bytes(), offsets))
}

/// Where each element of the top-level `resources` list of a YAML document
/// starts, in order, for a list in block style (`resources:` then `- ` items, as
/// people and `kubectl` write it): `None` for any other shape (a flow list, a
/// document whose top level is not a plain mapping), whose errors then name the
/// resource by its index alone.
pub fn yaml_resources(text: &str) -> Option<Vec<Position>> {
    let mut lines = text.lines().enumerate().peekable();
    // The top-level key, at column 0, with nothing after the colon.
    loop {
        let (_, line) = lines.next()?;
        let code = strip_comment(line);
        if let Some(rest) = code.strip_prefix("resources:") {
            if !rest.trim().is_empty() {
                return None;
            }
            break;
        }
    }
    let mut out = Vec::new();
    let mut indent: Option<usize> = None;
    for (n, line) in lines {
        let code = strip_comment(line);
        if code.trim().is_empty() {
            continue;
        }
        let spaces = code.len() - code.trim_start_matches(' ').len();
        let rest = &code[spaces..];
        let item = rest == "-" || rest.starts_with("- ");
        match indent {
            None if item => indent = Some(spaces),
            None => return None,
            Some(i) if spaces == i && item => {}
            // Deeper: inside the current item.
            Some(i) if spaces > i => continue,
            // Back at the top level: another key ends the list (an item at the
            // list's own indentation that is not an item cannot be).
            Some(_) if spaces == 0 && !item => break,
            Some(_) => return None,
        }
        out.push(Position {
            line: n + 1,
            column: spaces + 1,
        });
    }
    Some(out)
}

/// A YAML line without its trailing comment (a `#` after whitespace, outside
/// quotes: enough for the structure this module reads).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None => {}
        }
        prev = c;
    }
    line
}

/// Where each resource of a document starts: JSON exactly, YAML in block style.
pub fn resources(text: &str) -> Option<Vec<Position>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('{') {
        json_resources(text)
    } else {
        yaml_resources(text)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn at_each_gives_what_at_gives_for_every_offset() {
        let text = "{\n  \"résumé\": [1,\n\n 2, \"ünï\"],\r\n\"x\": 3 }\n";
        let bytes = text.as_bytes();
        let all: Vec<usize> = (0..=bytes.len() + 2).collect();
        let one_by_one: Vec<Position> = all.iter().map(|&o| at(bytes, o)).collect();
        assert_eq!(at_each(bytes, all.iter().copied()), one_by_one);
        // Offsets that go back are still right.
        let mixed = [9, 3, 20, 20, 0, bytes.len()];
        assert_eq!(
            at_each(bytes, mixed),
            mixed.iter().map(|&o| at(bytes, o)).collect::<Vec<_>>()
        );
    }
    use super::*;

    #[test]
    fn the_first_byte_that_is_not_utf8_is_named_by_line_and_column() {
        let mut bytes = b"resources:\n- \"@type\": x\n  name: caf\xc3\xa9 ".to_vec();
        bytes.push(0xff);
        let e = utf8(&bytes).expect_err("not UTF-8");
        assert_eq!(
            e.at,
            Position {
                line: 3,
                column: 14
            }
        );
        assert_eq!(
            e.to_string(),
            format!("not UTF-8 at line 3 column 14 (byte {})", bytes.len() - 1)
        );
    }

    #[test]
    fn yaml_block_resources_are_located_and_other_shapes_are_not_guessed() {
        let text = "version_info: \"1\"\n# a comment\nresources:\n- \"@type\": a # note\n  name: x\n  list:\n  - inner\n\n-   \"@type\": b\n  name: \"y # not a comment\"\nnext_key: 1\n";
        assert_eq!(
            yaml_resources(text),
            Some(vec![
                Position { line: 4, column: 1 },
                Position { line: 9, column: 1 }
            ])
        );
        let indented = "resources:\n  - a: 1\n    b:\n    - c\n  - a: 2\n";
        assert_eq!(
            yaml_resources(indented),
            Some(vec![
                Position { line: 2, column: 3 },
                Position { line: 5, column: 3 }
            ])
        );
        assert_eq!(yaml_resources("resources: [ {a: 1}, {a: 2} ]\n"), None);
        assert_eq!(yaml_resources("version_info: 1\n"), None);
    }

    #[test]
    fn json_resources_are_located_exactly() {
        let text =
            "{\"versionInfo\":\"1\",\n \"resources\": [\n  {\"a\": 1},\n  {\"b\": [1, 2]}\n ]}";
        assert_eq!(
            resources(text),
            Some(vec![
                Position { line: 3, column: 3 },
                Position { line: 4, column: 3 }
            ])
        );
    }
}

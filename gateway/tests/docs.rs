//! The README renders as written: every table keeps its columns on every row (a blank line or a stray `|`
//! turns the rest of a table into raw text), and every relative link and `#anchor` points at something that
//! exists. No PostgreSQL needed.

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The cells of a table row: split on `|` outside code spans, `\|` kept as text.
fn cells(row: &str) -> usize {
    let (mut count, mut code, mut escaped) = (0, false, false);
    for c in row.trim().chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '`' => code = !code,
            '|' if !code => count += 1,
            _ => {}
        }
    }
    count - 1
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Lines outside fenced code blocks, with their numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            if line.starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .map(|(i, line)| (i + 1, line))
        .collect()
}

#[test]
fn every_table_row_has_its_header_s_columns() {
    for file in ["README.md", "benches/README.md", "docs/design.md"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let mut header: Option<(usize, usize)> = None;
        let mut tables = 0;
        for (number, line) in prose(&text) {
            if !line.starts_with('|') {
                header = None;
                continue;
            }
            match header {
                None => {
                    header = Some((number, cells(line)));
                    tables += 1;
                }
                Some((at, columns)) => assert_eq!(
                    cells(line),
                    columns,
                    "{file}:{number}: a row of the table at line {at} has another number of columns:\n{line}"
                ),
            }
        }
        if file == "README.md" {
            assert!(tables >= 5, "{file}: {tables} tables");
        }
    }
}

#[test]
fn every_relative_link_and_anchor_exists() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let anchors: BTreeSet<String> = prose(&text)
        .iter()
        .filter_map(|(_, line)| {
            line.trim_start_matches('#')
                .strip_prefix(' ')
                .filter(|_| line.starts_with('#'))
        })
        .map(anchor)
        .collect();
    let mut checked = 0;
    for (number, line) in prose(&text) {
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            rest = &after[end..];
            if target.starts_with("http") {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            if path.is_empty() {
                assert!(
                    anchors.contains(fragment),
                    "README.md:{number}: no heading for #{fragment}"
                );
            } else {
                assert!(
                    root().join(path).exists(),
                    "README.md:{number}: {path} does not exist"
                );
            }
        }
    }
    assert!(checked > 3, "{checked} links checked");
}

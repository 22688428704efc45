//! The lexing primitives every scanner of SQL text shares: identifier bytes, where a token ends, and skipping
//! white space, comments, strings, quoted identifiers and dollar quotes as PostgreSQL reads them ("Lexical
//! Structure" in the PostgreSQL documentation). The session's classifier (`sql`), the fingerprint lexer and
//! the insert batcher all read statements through these, so a quote or comment ends in the same place for
//! each of them.
//!
//! A leaf: it knows bytes, not statements, and imports nothing from the rest of the crate. Nothing here
//! allocates: the fingerprint lexer calls into it for every statement.

use std::ops::Range;

/// The end of the lexical unit starting at `i` (see [`skip_token`]), clamped to the text.
pub fn token_end(s: &[u8], i: usize) -> usize {
    skip_token(s, i).min(s.len())
}

/// Skips one lexical unit starting at `i` (a quoted string, identifier, comment, dollar-quoted body, or one
/// byte) and returns the index after it. Unterminated quotes run to the end, as the server would see them.
pub fn skip_token(s: &[u8], i: usize) -> usize {
    match s[i] {
        b'\'' => {
            let escapes =
                i > 0 && matches!(s[i - 1], b'e' | b'E') && (i < 2 || !is_ident_byte(s[i - 2]));
            skip_quoted(s, i + 1, b'\'', escapes)
        }
        b'"' => skip_quoted(s, i + 1, b'"', false),
        b'-' if s.get(i + 1) == Some(&b'-') => match memchr::memchr(b'\n', &s[i..]) {
            Some(n) => i + n + 1,
            None => s.len(),
        },
        b'/' if s.get(i + 1) == Some(&b'*') => {
            let mut depth = 1;
            let mut j = i + 2;
            while j < s.len() && depth > 0 {
                if s[j] == b'/' && s.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if s[j] == b'*' && s.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            j
        }
        b'$' if i == 0 || !is_ident_byte(s[i - 1]) => match dollar_tag(s, i) {
            Some(tag_end) => {
                let tag = &s[i..tag_end];
                match memchr::memmem::find(&s[tag_end..], tag) {
                    Some(n) => tag_end + n + tag.len(),
                    None => s.len(),
                }
            }
            None => i + 1,
        },
        c if is_ident_byte(c) => ident_end(s, i + 1),
        _ => i + 1,
    }
}

/// The index after the closing `quote` of a quoted string or identifier whose text starts at `j` (doubled
/// quotes and, with `escapes`, backslash escapes inside it); the end of `s` when it is not closed.
pub fn skip_quoted(s: &[u8], mut j: usize, quote: u8, escapes: bool) -> usize {
    while j < s.len() {
        if escapes && s[j] == b'\\' {
            j += 2;
        } else if s[j] == quote {
            if s.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    s.len()
}

/// If `s[i..]` opens a dollar quote (`$$` or `$tag$`), the index after its opening tag.
fn dollar_tag(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if j < s.len() && (s[j].is_ascii_digit()) {
        return None; // $1 is a parameter
    }
    while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_' || s[j] >= 0x80) {
        j += 1;
    }
    (j < s.len() && s[j] == b'$').then_some(j + 1)
}

/// Bytes that continue an identifier (or a number), as a table: lexing statements is on the hot path.
static IDENT: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        c += 1;
    }
    table
};

/// Whether `c` continues an identifier (or a number): letters, digits, `_`, `$` and every non-ASCII byte.
pub fn is_ident_byte(c: u8) -> bool {
    IDENT[usize::from(c)]
}

/// The end of the identifier bytes from `i`.
pub fn ident_end(s: &[u8], i: usize) -> usize {
    s[i.min(s.len())..]
        .iter()
        .position(|&c| !is_ident_byte(c))
        .map_or(s.len(), |n| i + n)
}

/// Skips white space and comments.
pub fn skip_space(s: &[u8], mut i: usize) -> usize {
    loop {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i + 1 < s.len()
            && ((s[i] == b'-' && s[i + 1] == b'-') || (s[i] == b'/' && s[i + 1] == b'*'))
        {
            i = skip_token(s, i);
        } else {
            return i;
        }
    }
}

/// The lexical tokens of a statement, comments and white space skipped.
pub fn tokens(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    token_ranges(s).map(|range| &s[range])
}

/// Where the lexical tokens of `s` are.
pub fn token_ranges(s: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        i = skip_space(s, i);
        if i >= s.len() {
            return None;
        }
        let end = token_end(s, i);
        let range = i..end;
        i = end;
        Some(range)
    })
}

/// What is inside a dollar-quoted string token (`$$…$$`, `$tag$…$tag$`).
pub fn dollar_quoted_body(token: &[u8]) -> Option<&[u8]> {
    if token.first() != Some(&b'$') {
        return None;
    }
    let tag_end = dollar_tag(token, 0)?;
    let tag_len = tag_end;
    (token.len() >= 2 * tag_len).then(|| &token[tag_end..token.len() - tag_len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_ends_as_the_table_says() {
        // Every byte value, at every position of an eight-byte chunk and at the end of the text.
        for b in 0..=255u8 {
            for at in 0..10 {
                let mut text = vec![b'a'; at];
                text.push(b);
                text.extend_from_slice(b"bc");
                let expected = if IDENT[usize::from(b)] {
                    text.len()
                } else {
                    at
                };
                assert_eq!(ident_end(&text, 0), expected, "byte {b:#x} at {at}");
                assert_eq!(
                    ident_end(&text[..=at], 0),
                    if IDENT[usize::from(b)] { at + 1 } else { at }
                );
            }
        }
        assert_eq!(ident_end(b"abc", 3), 3);
        assert_eq!(ident_end(b"abc def", 1), 3);
    }
}

//! A small, forgiving HTML tokenizer: start tags with attributes, end tags, text with
//! character references decoded. Comments, doctypes and processing instructions are
//! skipped; the content of raw-text elements (`script`, `style`, …) comes back as one text
//! token. It never fails and never recurses: any byte sequence gives some token stream.

use std::borrow::Cow;

/// Most attributes kept per tag; the rest are ignored.
const MAX_ATTRS: usize = 32;

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token<'a> {
    /// `<name attr=value …>`; the name is lower-cased.
    Start {
        /// Tag name, lower-case.
        name: String,
        /// Attributes (lower-case names, decoded values), in source order.
        attrs: Vec<(String, String)>,
    },
    /// `</name>`; the name is lower-cased.
    End {
        /// Tag name, lower-case.
        name: String,
    },
    /// Text with character references decoded.
    Text(Cow<'a, str>),
}

/// Elements whose content is raw text up to their end tag.
fn raw_text_element(name: &str) -> bool {
    matches!(
        name,
        "script"
            | "style"
            | "textarea"
            | "title"
            | "xmp"
            | "iframe"
            | "noembed"
            | "noframes"
            | "noscript"
    )
}

/// Elements whose raw text still has character references decoded.
fn rcdata_element(name: &str) -> bool {
    matches!(name, "textarea" | "title")
}

/// The tokenizer.
pub struct Tokenizer<'a> {
    src: &'a str,
    pos: usize,
    raw_end: Option<String>,
}

impl<'a> Tokenizer<'a> {
    /// Tokenizes `src`.
    pub fn new(src: &'a str) -> Self {
        Tokenizer {
            src,
            pos: 0,
            raw_end: None,
        }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    /// Finds `</name` (ASCII case-insensitive) at or after `from`.
    fn find_end_tag(&self, name: &str) -> Option<usize> {
        let bytes = self.src.as_bytes();
        let mut i = self.pos;
        while let Some(off) = self.src[i..].find("</") {
            let at = i + off;
            let start = at + 2;
            let end = start + name.len();
            if end <= bytes.len() && bytes[start..end].eq_ignore_ascii_case(name.as_bytes()) {
                let next = bytes.get(end).copied();
                if matches!(
                    next,
                    None | Some(b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
                ) {
                    return Some(at);
                }
            }
            i = at + 2;
        }
        None
    }

    fn skip_past(&mut self, pat: &str) {
        match self.rest().find(pat) {
            Some(off) => self.pos += off + pat.len(),
            None => self.pos = self.src.len(),
        }
    }

    fn tag_name(&mut self) -> String {
        let rest = self.rest();
        let len = rest
            .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
            .unwrap_or(rest.len());
        self.pos += len;
        rest[..len].to_ascii_lowercase()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        let len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_whitespace())
                .len();
        self.pos += len;
    }

    fn attributes(&mut self) -> (Vec<(String, String)>, bool) {
        let mut attrs = Vec::new();
        loop {
            self.skip_ws();
            let rest = self.rest();
            if rest.is_empty() {
                return (attrs, false);
            }
            if rest.starts_with('>') {
                self.pos += 1;
                return (attrs, false);
            }
            if rest.starts_with("/>") {
                self.pos += 2;
                return (attrs, true);
            }
            if rest.starts_with('/') {
                self.pos += 1;
                continue;
            }
            let len = rest
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c.is_ascii_whitespace() || c == '=' || c == '>' || c == '/')
                .map_or(rest.len(), |(i, _)| i);
            let name = rest[..len].to_ascii_lowercase();
            self.pos += len;
            self.skip_ws();
            let mut value = String::new();
            if self.rest().starts_with('=') {
                self.pos += 1;
                self.skip_ws();
                let rest = self.rest();
                let raw = match rest.chars().next() {
                    Some(q @ ('"' | '\'')) => {
                        let body = &rest[1..];
                        let end = body.find(q).unwrap_or(body.len());
                        self.pos += 1 + end + usize::from(end < body.len());
                        &body[..end]
                    }
                    _ => {
                        let end = rest
                            .find(|c: char| c.is_ascii_whitespace() || c == '>')
                            .unwrap_or(rest.len());
                        self.pos += end;
                        &rest[..end]
                    }
                };
                value = decode_entities(raw).into_owned();
            }
            if attrs.len() < MAX_ATTRS && !attrs.iter().any(|(n, _)| *n == name) {
                attrs.push((name, value));
            }
        }
    }
}

impl<'a> Iterator for Tokenizer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        loop {
            if self.pos >= self.src.len() {
                return None;
            }
            if let Some(name) = self.raw_end.take() {
                let end = self.find_end_tag(&name).unwrap_or(self.src.len());
                let text = &self.src[self.pos..end];
                self.pos = end;
                if text.is_empty() {
                    continue;
                }
                return Some(Token::Text(if rcdata_element(&name) {
                    decode_entities(text)
                } else {
                    Cow::Borrowed(text)
                }));
            }
            let rest = self.rest();
            if let Some(after) = rest.strip_prefix('<') {
                let next = after.as_bytes().first().copied();
                if after.starts_with("!--") {
                    self.pos += 4;
                    self.skip_past("-->");
                    continue;
                }
                if matches!(next, Some(b'!' | b'?')) {
                    self.skip_past(">");
                    continue;
                }
                if next == Some(b'/') {
                    if after.as_bytes().get(1).is_some_and(u8::is_ascii_alphabetic) {
                        self.pos += 2;
                        let name = self.tag_name();
                        self.skip_past(">");
                        return Some(Token::End { name });
                    }
                    // `</` not followed by a letter: a bogus comment.
                    self.skip_past(">");
                    continue;
                }
                if next.is_some_and(|b| b.is_ascii_alphabetic()) {
                    self.pos += 1;
                    let name = self.tag_name();
                    let (attrs, self_closing) = self.attributes();
                    if raw_text_element(&name) && !self_closing {
                        self.raw_end = Some(name.clone());
                    }
                    return Some(Token::Start { name, attrs });
                }
                // A lone '<' is text.
                self.pos += 1;
                return Some(Token::Text(Cow::Borrowed("<")));
            }
            let end = rest.find('<').unwrap_or(rest.len());
            self.pos += end;
            return Some(Token::Text(decode_entities(&rest[..end])));
        }
    }
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "mdash" => '—',
        "ndash" => '–',
        "hellip" => '…',
        "laquo" => '«',
        "raquo" => '»',
        "lsaquo" => '‹',
        "rsaquo" => '›',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "sbquo" => '‚',
        "bdquo" => '„',
        "bull" => '•',
        "middot" => '·',
        "times" => '×',
        "divide" => '÷',
        "deg" => '°',
        "plusmn" => '±',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "sect" => '§',
        "para" => '¶',
        "larr" => '←',
        "rarr" => '→',
        "uarr" => '↑',
        "darr" => '↓',
        "harr" => '↔',
        "hearts" => '♥',
        "check" => '✓',
        "shy" => '\u{ad}',
        "zwj" => '\u{200d}',
        "zwnj" => '\u{200c}',
        "ensp" => '\u{2002}',
        "emsp" => '\u{2003}',
        "thinsp" => '\u{2009}',
        "iexcl" => '¡',
        "iquest" => '¿',
        "auml" => 'ä',
        "ouml" => 'ö',
        "uuml" => 'ü',
        "Auml" => 'Ä',
        "Ouml" => 'Ö',
        "Uuml" => 'Ü',
        "szlig" => 'ß',
        "eacute" => 'é',
        "egrave" => 'è',
        "aacute" => 'á',
        "agrave" => 'à',
        "ccedil" => 'ç',
        "ntilde" => 'ñ',
        "oacute" => 'ó',
        "iacute" => 'í',
        "uacute" => 'ú',
        _ => return None,
    })
}

/// Decodes character references (`&amp;`, `&#233;`, `&#x1F600;`); unknown ones stay as
/// they are.
pub fn decode_entities(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let body = &rest[1..];
        let (decoded, used) = if let Some(num) = body.strip_prefix('#') {
            let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
                Some(hex) => (hex, 16, 2),
                None => (num, 10, 1),
            };
            let len = digits
                .find(|c: char| !c.is_digit(radix))
                .unwrap_or(digits.len());
            if len == 0 || len > 8 {
                (None, 0)
            } else {
                let value = u32::from_str_radix(&digits[..len], radix).unwrap_or(0xfffd);
                let c = match value {
                    0 => '\u{fffd}',
                    v => char::from_u32(v).unwrap_or('\u{fffd}'),
                };
                let semi = usize::from(digits[len..].starts_with(';'));
                (Some(c), 1 + skip + len + semi)
            }
        } else {
            let len = body
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(body.len());
            let name = &body[..len];
            let semi = body[len..].starts_with(';');
            match named_entity(name) {
                // Without a semicolon only the legacy few are recognised.
                Some(c) if semi || matches!(name, "amp" | "lt" | "gt" | "quot" | "nbsp") => {
                    (Some(c), 1 + len + usize::from(semi))
                }
                _ => (None, 0),
            }
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(s: &str) -> Vec<Token<'_>> {
        Tokenizer::new(s).collect()
    }

    #[test]
    fn tags_attributes_and_text() {
        let t = tokens(r#"<A HREF="/x?a=1&amp;b=2" class=big data-x>Hi &amp; bye</a>"#);
        assert_eq!(
            t,
            vec![
                Token::Start {
                    name: "a".into(),
                    attrs: vec![
                        ("href".into(), "/x?a=1&b=2".into()),
                        ("class".into(), "big".into()),
                        ("data-x".into(), String::new())
                    ],
                },
                Token::Text("Hi & bye".into()),
                Token::End { name: "a".into() },
            ]
        );
    }

    #[test]
    fn comments_doctype_and_raw_text() {
        let t = tokens("<!DOCTYPE html><!-- <p>no</p> --><script>if (a<b) x='</p>'</script><p>y");
        assert_eq!(
            t,
            vec![
                Token::Start {
                    name: "script".into(),
                    attrs: vec![]
                },
                Token::Text("if (a<b) x='</p>'".into()),
                Token::End {
                    name: "script".into()
                },
                Token::Start {
                    name: "p".into(),
                    attrs: vec![]
                },
                Token::Text("y".into()),
            ]
        );
    }

    #[test]
    fn entities() {
        assert_eq!(
            decode_entities("&lt;&#65;&#x42;&unknown;&amp"),
            "<AB&unknown;&"
        );
        assert_eq!(decode_entities("&#0;&#x110000;"), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn garbage_never_panics() {
        for s in [
            "<",
            "</",
            "<a",
            "<a href='",
            "&#",
            "&#x;",
            "<!--",
            "<script>",
            "</ >",
            "<a =>",
        ] {
            let _ = tokens(s);
        }
    }
}

//! Resolving link targets against the page URL (RFC 3986 §5.2, enough for links).

/// A parsed absolute base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    scheme: String,
    authority: String,
    path: String,
    query: String,
}

impl Base {
    /// Parses `scheme://authority/path?query#fragment`; `None` when it is not of that form.
    pub fn parse(url: &str) -> Option<Base> {
        let (scheme, rest) = url.split_once("://")?;
        if !valid_scheme(scheme) {
            return None;
        }
        let rest = rest.split('#').next().unwrap_or("");
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, format!("?{q}")),
            None => (rest, String::new()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        Some(Base {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_string(),
            path: path.to_string(),
            query,
        })
    }

    fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

fn valid_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The scheme of `href`, lower-cased, if it has one.
fn scheme_of(href: &str) -> Option<String> {
    let colon = href.find(':')?;
    let candidate = &href[..colon];
    if valid_scheme(candidate) && !candidate.contains('/') {
        Some(candidate.to_ascii_lowercase())
    } else {
        None
    }
}

/// Removes `.` and `..` segments from an absolute path.
fn remove_dots(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Splits `path?query#fragment` into the path and the rest.
fn split_path(s: &str) -> (&str, &str) {
    let i = s.find(['?', '#']).unwrap_or(s.len());
    (&s[..i], &s[i..])
}

/// Makes a URL safe inside Markdown's `(…)`.
fn encode_for_markdown(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for c in url.chars() {
        match c {
            ' ' => out.push_str("%20"),
            '(' => out.push_str("%28"),
            ')' => out.push_str("%29"),
            '<' => out.push_str("%3C"),
            '>' => out.push_str("%3E"),
            c => out.push(c),
        }
    }
    out
}

/// Resolves `href` against `base`. `None` for empty targets and for `javascript:`,
/// `vbscript:` and `data:` URLs, which are dropped.
pub fn resolve(base: Option<&Base>, href: &str) -> Option<String> {
    let href: String = href
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    if href.is_empty() {
        return None;
    }
    if let Some(scheme) = scheme_of(&href) {
        if matches!(scheme.as_str(), "javascript" | "vbscript" | "data") {
            return None;
        }
        return Some(encode_for_markdown(&href));
    }
    let Some(base) = base else {
        return Some(encode_for_markdown(&href));
    };
    let resolved = if let Some(rest) = href.strip_prefix("//") {
        let (auth_path, tail) = split_path(rest);
        let (authority, path) = match auth_path.find('/') {
            Some(i) => (&auth_path[..i], &auth_path[i..]),
            None => (auth_path, "/"),
        };
        format!("{}://{authority}{}{tail}", base.scheme, remove_dots(path))
    } else if href.starts_with('#') {
        format!("{}{}{}{href}", base.origin(), base.path, base.query)
    } else if href.starts_with('?') {
        format!("{}{}{href}", base.origin(), base.path)
    } else if href.starts_with('/') {
        let (path, tail) = split_path(&href);
        format!("{}{}{tail}", base.origin(), remove_dots(path))
    } else {
        let dir = &base.path[..base.path.rfind('/').map_or(0, |i| i + 1)];
        let (path, tail) = split_path(&href);
        format!(
            "{}{}{tail}",
            base.origin(),
            remove_dots(&format!("{dir}{path}"))
        )
    };
    Some(encode_for_markdown(&resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3986_examples() {
        let base = Base::parse("http://a/b/c/d;p?q").unwrap();
        let r = |h| resolve(Some(&base), h).unwrap();
        assert_eq!(r("g"), "http://a/b/c/g");
        assert_eq!(r("./g"), "http://a/b/c/g");
        assert_eq!(r("g/"), "http://a/b/c/g/");
        assert_eq!(r("/g"), "http://a/g");
        assert_eq!(r("//g"), "http://g/");
        assert_eq!(r("?y"), "http://a/b/c/d;p?y");
        assert_eq!(r("g?y"), "http://a/b/c/g?y");
        assert_eq!(r("#s"), "http://a/b/c/d;p?q#s");
        assert_eq!(r("g#s"), "http://a/b/c/g#s");
        assert_eq!(r(".."), "http://a/b/");
        assert_eq!(r("../g"), "http://a/b/g");
        assert_eq!(r("../.."), "http://a/");
        assert_eq!(r("../../../g"), "http://a/g");
        assert_eq!(r("https://x.example/a b"), "https://x.example/a%20b");
        assert_eq!(resolve(Some(&base), "javascript:alert(1)"), None);
        assert_eq!(resolve(Some(&base), " DATA:text/html,x"), None);
        assert_eq!(resolve(Some(&base), "  "), None);
        assert_eq!(r("mailto:a@b.example"), "mailto:a@b.example");
    }
}

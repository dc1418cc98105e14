//! HTML → Markdown (CommonMark with GFM tables).
//!
//! A single pass over the token stream with an explicit, capped stack of open elements:
//! no recursion, so nesting depth costs nothing but the cap ([`MAX_DEPTH`]); elements
//! nested deeper are treated as transparent. Output is capped at [`MAX_OUTPUT`] bytes.

use crate::html::{Token, Tokenizer};
use crate::url::{Base, resolve};

/// Deepest element nesting tracked; deeper tags are transparent.
pub const MAX_DEPTH: usize = 256;
/// Largest Markdown produced; longer output is cut with a marker.
pub const MAX_OUTPUT: usize = 4 * 1024 * 1024 - 4096;
/// Marker appended when the output was cut.
pub const TRUNCATED: &str = "\n\n[… truncated]\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrap {
    Strong,
    Emph,
    Strike,
    Code,
}

#[derive(Debug)]
enum Open {
    /// A block or unknown element: its end is a block boundary (or nothing, if inline).
    Plain {
        name: String,
        block: bool,
    },
    Heading {
        name: String,
        level: usize,
    },
    Link {
        start: usize,
        generation: u64,
        href: Option<String>,
    },
    Wrap {
        name: String,
        start: usize,
        generation: u64,
        kind: Wrap,
    },
    List,
    Item,
    Quote,
    Pre,
    Table,
    Row,
    Cell,
    Skip {
        name: String,
        counted: bool,
    },
}

impl Open {
    fn name(&self) -> &str {
        match self {
            Open::Plain { name, .. } | Open::Heading { name, .. } | Open::Wrap { name, .. } => name,
            Open::Skip { name, .. } => name,
            Open::Link { .. } => "a",
            Open::List => "list",
            Open::Item => "li",
            Open::Quote => "blockquote",
            Open::Pre => "pre",
            Open::Table => "table",
            Open::Row => "tr",
            Open::Cell => "td",
        }
    }

    fn matches(&self, tag: &str) -> bool {
        match self {
            Open::List => matches!(tag, "ul" | "ol" | "menu"),
            Open::Cell => matches!(tag, "td" | "th"),
            _ => self.name() == tag,
        }
    }
}

#[derive(Debug)]
enum Container {
    Quote,
    Item { marker: String, started: bool },
}

#[derive(Debug, Default)]
struct Table {
    rows: Vec<Vec<String>>,
    row: Option<Vec<String>>,
    in_cell: bool,
    caption: String,
}

struct Converter {
    base: Option<Base>,
    out: String,
    inline: String,
    generation: u64,
    stack: Vec<Open>,
    overflow: usize,
    containers: Vec<Container>,
    lists: Vec<(bool, u64)>,
    skip: usize,
    pre: usize,
    pre_buf: String,
    pre_lang: String,
    code: usize,
    table: Option<Table>,
    nested_tables: usize,
    last_in_list: bool,
    /// Fewest containers open since the last block was written: the blank line between
    /// two blocks carries only the prefixes they share.
    shared_containers: usize,
    truncated: bool,
}

fn is_void(name: &str) -> bool {
    matches!(
        name,
        "area"
            | "base"
            | "br"
            | "col"
            | "embed"
            | "hr"
            | "img"
            | "input"
            | "link"
            | "meta"
            | "source"
            | "track"
            | "wbr"
            | "param"
            | "keygen"
    )
}

fn is_skipped(name: &str) -> bool {
    matches!(
        name,
        "head"
            | "script"
            | "style"
            | "noscript"
            | "template"
            | "svg"
            | "math"
            | "iframe"
            | "object"
            | "canvas"
            | "select"
            | "textarea"
            | "title"
            | "noembed"
            | "noframes"
            | "button"
            | "dialog"
    )
}

fn is_block(name: &str) -> bool {
    matches!(
        name,
        "p" | "div"
            | "section"
            | "article"
            | "main"
            | "header"
            | "footer"
            | "nav"
            | "aside"
            | "address"
            | "figure"
            | "figcaption"
            | "form"
            | "fieldset"
            | "legend"
            | "details"
            | "summary"
            | "dl"
            | "dt"
            | "dd"
            | "center"
            | "hgroup"
            | "body"
            | "html"
            | "caption"
            | "search"
    )
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn escape_into(out: &mut String, c: char) {
    if matches!(c, '\\' | '*' | '_' | '`' | '[' | ']' | '<') {
        out.push('\\');
    }
    out.push(c);
}

/// Escapes what would make a paragraph line start a different block.
fn escape_line_start(line: &str) -> String {
    let needs = match line.as_bytes().first() {
        Some(b'#' | b'>' | b'+' | b'=' | b'|') => true,
        Some(b'-') => true,
        Some(b'0'..=b'9') => {
            let digits = line.bytes().take_while(u8::is_ascii_digit).count();
            matches!(line.as_bytes().get(digits), Some(b'.' | b')'))
        }
        _ => false,
    };
    if !needs {
        return line.to_string();
    }
    if line.as_bytes()[0].is_ascii_digit() {
        let digits = line.bytes().take_while(u8::is_ascii_digit).count();
        format!("{}\\{}", &line[..digits], &line[digits..])
    } else {
        format!("\\{line}")
    }
}

impl Converter {
    fn new(base_url: &str) -> Self {
        Converter {
            base: Base::parse(base_url),
            out: String::new(),
            inline: String::new(),
            generation: 0,
            stack: Vec::new(),
            overflow: 0,
            containers: Vec::new(),
            lists: Vec::new(),
            skip: 0,
            pre: 0,
            pre_buf: String::new(),
            pre_lang: String::new(),
            code: 0,
            table: None,
            nested_tables: 0,
            last_in_list: false,
            shared_containers: 0,
            truncated: false,
        }
    }

    fn in_table(&self) -> bool {
        self.table.is_some()
    }

    /// Writes one block (possibly several lines) with the container prefixes.
    fn emit_block(&mut self, text: &str) {
        if self.truncated || text.trim().is_empty() {
            return;
        }
        let in_list = self
            .containers
            .iter()
            .any(|c| matches!(c, Container::Item { .. }));
        if !self.out.is_empty() {
            self.out.push('\n');
            if !(in_list && self.last_in_list) {
                let shared = self.shared_containers.min(self.containers.len());
                let blank = Self::prefix_of(&self.containers[..shared], false);
                self.out.push_str(blank.trim_end());
                self.out.push('\n');
            }
        }
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                self.out.push('\n');
            }
            let prefix = self.prefix(i == 0);
            self.out.push_str(&prefix);
            self.out.push_str(line);
            let l = self.out.trim_end_matches([' ', '\t']).len();
            if !line.ends_with("  ") {
                self.out.truncate(l);
            }
            if i == 0 {
                for c in &mut self.containers {
                    if let Container::Item { started, .. } = c {
                        *started = true;
                    }
                }
            }
        }
        self.last_in_list = in_list;
        self.shared_containers = self.containers.len();
        if self.out.len() > MAX_OUTPUT {
            let mut cut = MAX_OUTPUT;
            while !self.out.is_char_boundary(cut) {
                cut -= 1;
            }
            self.out.truncate(cut);
            self.out.push_str(TRUNCATED);
            self.truncated = true;
        }
    }

    /// The prefix of a line: `> ` per quote, the marker or its width per list item.
    fn prefix(&self, first_line: bool) -> String {
        Self::prefix_of(&self.containers, first_line)
    }

    fn prefix_of(containers: &[Container], first_line: bool) -> String {
        let mut p = String::new();
        let last_item = containers
            .iter()
            .rposition(|c| matches!(c, Container::Item { .. }));
        for (i, c) in containers.iter().enumerate() {
            match c {
                Container::Quote => p.push_str("> "),
                Container::Item { marker, started } => {
                    if first_line && !started && Some(i) == last_item {
                        p.push_str(marker);
                    } else {
                        p.extend(std::iter::repeat_n(' ', marker.len()));
                    }
                }
            }
        }
        p
    }

    /// Ends the current paragraph.
    fn flush(&mut self) {
        let text = std::mem::take(&mut self.inline);
        self.generation += 1;
        let text = text.trim_matches(|c: char| c == ' ' || c == '\n');
        if text.is_empty() {
            return;
        }
        let lines: Vec<String> = text
            .split('\n')
            .map(|l| escape_line_start(l.trim_start()))
            .collect();
        self.emit_block(&lines.join("\n"));
    }

    /// A block boundary: a new paragraph, or a space inside a table cell.
    fn boundary(&mut self) {
        if self.in_table() {
            self.space();
        } else {
            self.flush();
        }
    }

    fn space(&mut self) {
        if !self.inline.is_empty() && !self.inline.ends_with([' ', '\n']) {
            self.inline.push(' ');
        }
    }

    fn text(&mut self, s: &str) {
        if self.skip > 0 || self.truncated {
            return;
        }
        if self.pre > 0 {
            if self.in_table() {
                self.inline_text(s);
            } else {
                self.pre_buf.push_str(s);
            }
            return;
        }
        self.inline_text(s);
    }

    fn inline_text(&mut self, s: &str) {
        for c in s.chars() {
            if c.is_whitespace() {
                self.space();
            } else if self.code > 0 {
                self.inline.push(c);
            } else {
                escape_into(&mut self.inline, c);
            }
        }
        if self.inline.len() > MAX_OUTPUT {
            self.flush();
        }
    }

    fn push(&mut self, open: Open) {
        if self.stack.len() >= MAX_DEPTH {
            self.overflow += 1;
        } else {
            self.stack.push(open);
        }
    }

    /// Closes open elements down to and including the nearest one matching `tag`, if any
    /// such element is open above a `stop` element.
    fn close_to(&mut self, tag: &str, stop: &[&str]) -> bool {
        let Some(pos) = self
            .stack
            .iter()
            .rposition(|o| o.matches(tag) || stop.iter().any(|s| o.matches(s)))
        else {
            return false;
        };
        if !self.stack[pos].matches(tag) {
            return false;
        }
        while self.stack.len() > pos {
            if let Some(open) = self.stack.pop() {
                self.close(open);
            }
        }
        true
    }

    fn start(&mut self, name: String, attrs: Vec<(String, String)>) {
        if self.stack.len() >= MAX_DEPTH && !is_void(&name) {
            self.overflow += 1;
            return;
        }
        if self.skip > 0 {
            if !is_void(&name) {
                self.push(Open::Skip {
                    name,
                    counted: false,
                });
            }
            return;
        }
        let hidden =
            attr(&attrs, "hidden").is_some() || attr(&attrs, "aria-hidden") == Some("true");
        if (hidden && !is_void(&name)) || is_skipped(&name) {
            self.skip += 1;
            self.push(Open::Skip {
                name,
                counted: true,
            });
            return;
        }
        if self.pre > 0 && !self.in_table() {
            match name.as_str() {
                "br" => self.pre_buf.push('\n'),
                "code" if self.pre_lang.is_empty() => {
                    if let Some(class) = attr(&attrs, "class") {
                        self.pre_lang = class
                            .split_whitespace()
                            .find_map(|c| {
                                c.strip_prefix("language-")
                                    .or_else(|| c.strip_prefix("lang-"))
                            })
                            .unwrap_or("")
                            .chars()
                            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '#'))
                            .take(32)
                            .collect();
                    }
                }
                _ => {}
            }
            if !is_void(&name) {
                self.push(Open::Plain { name, block: false });
            }
            return;
        }
        match name.as_str() {
            "br" => {
                if self.in_table() {
                    self.space();
                } else {
                    let l = self.inline.trim_end_matches(' ').len();
                    self.inline.truncate(l);
                    if !self.inline.is_empty() {
                        self.inline.push_str("  \n");
                    }
                }
            }
            "hr" => {
                if self.in_table() {
                    self.space();
                } else {
                    self.flush();
                    self.emit_block("---");
                }
            }
            "img" => {
                let src = attr(&attrs, "src").and_then(|s| resolve(self.base.as_ref(), s));
                if let Some(src) = src {
                    let alt = attr(&attrs, "alt").unwrap_or("");
                    let mut md = String::from("![");
                    for c in alt.split_whitespace().collect::<Vec<_>>().join(" ").chars() {
                        escape_into(&mut md, c);
                    }
                    md.push_str("](");
                    md.push_str(&src);
                    md.push(')');
                    self.inline.push_str(&md);
                }
            }
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                self.close_to("p", &[]);
                self.boundary();
                let level = usize::from(name.as_bytes()[1] - b'0');
                self.push(Open::Heading { name, level });
            }
            "a" => {
                self.close_to("a", &[]);
                let href = attr(&attrs, "href").and_then(|h| resolve(self.base.as_ref(), h));
                let open = Open::Link {
                    start: self.inline.len(),
                    generation: self.generation,
                    href,
                };
                self.push(open);
            }
            "strong" | "b" | "em" | "i" | "del" | "s" | "strike" | "code" | "kbd" | "samp"
            | "tt" => {
                let kind = match name.as_str() {
                    "strong" | "b" => Wrap::Strong,
                    "em" | "i" => Wrap::Emph,
                    "del" | "s" | "strike" => Wrap::Strike,
                    _ => Wrap::Code,
                };
                if kind == Wrap::Code {
                    self.code += 1;
                }
                let open = Open::Wrap {
                    name,
                    start: self.inline.len(),
                    generation: self.generation,
                    kind,
                };
                self.push(open);
            }
            "ul" | "ol" | "menu" => {
                self.close_to("p", &[]);
                self.boundary();
                if !self.in_table() {
                    let start = attr(&attrs, "start")
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .unwrap_or(1)
                        .min(999_999_999);
                    self.lists.push((name == "ol", start));
                }
                self.push(Open::List);
            }
            "li" => {
                self.close_to("li", &["ul", "ol", "menu", "table"]);
                self.boundary();
                if self.in_table() {
                    self.push(Open::Plain { name, block: true });
                    return;
                }
                let marker = match self.lists.last_mut() {
                    Some((true, n)) => {
                        let m = format!("{n}. ");
                        *n += 1;
                        m
                    }
                    _ => "- ".to_string(),
                };
                self.containers.push(Container::Item {
                    marker,
                    started: false,
                });
                self.push(Open::Item);
            }
            "blockquote" => {
                self.close_to("p", &[]);
                self.boundary();
                if self.in_table() {
                    self.push(Open::Plain { name, block: true });
                } else {
                    self.containers.push(Container::Quote);
                    self.push(Open::Quote);
                }
            }
            "pre" | "listing" | "plaintext" => {
                self.close_to("p", &[]);
                self.boundary();
                self.pre += 1;
                if self.pre == 1 {
                    self.pre_buf.clear();
                    self.pre_lang.clear();
                }
                self.push(Open::Pre);
            }
            "table" => {
                self.close_to("p", &[]);
                if self.in_table() {
                    self.nested_tables += 1;
                    self.space();
                    self.push(Open::Plain { name, block: true });
                } else {
                    self.flush();
                    self.table = Some(Table::default());
                    self.push(Open::Table);
                }
            }
            "tr" if self.nested_tables == 0 && self.in_table() => {
                self.close_to("tr", &["table"]);
                self.end_row();
                if let Some(t) = &mut self.table {
                    t.row = Some(Vec::new());
                }
                self.push(Open::Row);
            }
            "td" | "th" if self.nested_tables == 0 && self.in_table() => {
                self.close_to("td", &["tr", "table"]);
                self.start_cell();
                self.push(Open::Cell);
            }
            _ => {
                let block = is_block(&name) || matches!(name.as_str(), "td" | "th" | "tr");
                if block {
                    if name == "p" || name == "div" {
                        self.close_to("p", &["div", "li", "td", "blockquote", "table"]);
                    }
                    if name == "dt" || name == "dd" {
                        self.close_to("dt", &["dl"]);
                        self.close_to("dd", &["dl"]);
                    }
                    self.boundary();
                }
                if !is_void(&name) {
                    self.push(Open::Plain { name, block });
                }
            }
        }
    }

    fn start_cell(&mut self) {
        // Stray text (a caption, say) before the first cell becomes the caption.
        let stray = std::mem::take(&mut self.inline);
        self.generation += 1;
        if let Some(t) = &mut self.table {
            if t.row.is_none() {
                t.row = Some(Vec::new());
            }
            let stray = stray.trim();
            if !stray.is_empty() {
                if !t.caption.is_empty() {
                    t.caption.push(' ');
                }
                t.caption.push_str(stray);
            }
            t.in_cell = true;
        }
    }

    fn end_cell(&mut self) {
        let text = std::mem::take(&mut self.inline);
        self.generation += 1;
        if let Some(t) = &mut self.table
            && t.in_cell
        {
            let cell = text
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace('|', "\\|");
            t.row.get_or_insert_with(Vec::new).push(cell);
            t.in_cell = false;
        }
    }

    fn end_row(&mut self) {
        if let Some(t) = &mut self.table
            && let Some(row) = t.row.take()
            && !row.is_empty()
        {
            t.rows.push(row);
        }
    }

    fn end_table(&mut self) {
        self.end_cell();
        self.end_row();
        let stray = std::mem::take(&mut self.inline);
        self.generation += 1;
        let Some(t) = self.table.take() else {
            return;
        };
        let mut caption = t.caption;
        let stray = stray.trim();
        if !stray.is_empty() {
            if !caption.is_empty() {
                caption.push(' ');
            }
            caption.push_str(stray);
        }
        if !caption.is_empty() {
            self.emit_block(&escape_line_start(&caption));
        }
        let cols = t.rows.iter().map(Vec::len).max().unwrap_or(0);
        if cols == 0 {
            return;
        }
        let mut md = String::new();
        for (i, row) in t.rows.iter().enumerate() {
            if i > 0 {
                md.push('\n');
            }
            md.push('|');
            for c in 0..cols {
                md.push(' ');
                md.push_str(row.get(c).map_or("", String::as_str));
                md.push_str(" |");
            }
            if i == 0 {
                md.push('\n');
                md.push('|');
                for _ in 0..cols {
                    md.push_str(" --- |");
                }
            }
        }
        self.emit_block(&md);
    }

    fn end(&mut self, name: &str) {
        if self.overflow > 0 {
            self.overflow -= 1;
            return;
        }
        let stop: &[&str] = match name {
            "li" => &["ul", "ol", "menu"],
            "td" | "th" | "tr" => &["table"],
            _ => &[],
        };
        let tag = if name == "th" { "td" } else { name };
        if !self.close_to(tag, stop) && (name == "p" || name == "br") && self.skip == 0 {
            // `</p>` without `<p>` and `</br>` act as their start tags do in browsers.
            if name == "br" {
                self.start("br".into(), Vec::new());
            } else {
                self.boundary();
            }
        }
    }

    fn wrap(&mut self, start: usize, generation: u64, left: &str, right: &str) {
        if generation != self.generation || start > self.inline.len() {
            return;
        }
        let segment = self.inline.split_off(start);
        let trimmed = segment.trim_matches(' ');
        if trimmed.is_empty() {
            self.inline.push_str(&segment);
            return;
        }
        if segment.starts_with(' ') {
            self.space();
        }
        self.inline.push_str(left);
        self.inline.push_str(trimmed);
        self.inline.push_str(right);
        if segment.ends_with(' ') {
            self.inline.push(' ');
        }
    }

    fn close(&mut self, open: Open) {
        match open {
            Open::Skip { counted, .. } => {
                if counted {
                    self.skip = self.skip.saturating_sub(1);
                }
            }
            Open::Plain { name, block } => {
                if name == "table" {
                    self.nested_tables = self.nested_tables.saturating_sub(1);
                }
                if block && self.pre == 0 {
                    self.boundary();
                }
            }
            Open::Heading { level, .. } => {
                if self.in_table() {
                    self.space();
                    return;
                }
                let text = std::mem::take(&mut self.inline);
                self.generation += 1;
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if !text.is_empty() {
                    let hashes = "#".repeat(level);
                    self.emit_block(&format!("{hashes} {text}"));
                }
            }
            Open::Link {
                start,
                generation,
                href,
            } => {
                if let Some(href) = href {
                    self.wrap(start, generation, "[", &format!("]({href})"));
                }
            }
            Open::Wrap {
                start,
                generation,
                kind,
                ..
            } => match kind {
                Wrap::Strong => self.wrap(start, generation, "**", "**"),
                Wrap::Emph => self.wrap(start, generation, "*", "*"),
                Wrap::Strike => self.wrap(start, generation, "~~", "~~"),
                Wrap::Code => {
                    self.code = self.code.saturating_sub(1);
                    let fence = if self.inline.get(start..).is_some_and(|s| s.contains('`')) {
                        "``"
                    } else {
                        "`"
                    };
                    let (l, r) = if fence == "``" {
                        ("`` ", " ``")
                    } else {
                        ("`", "`")
                    };
                    self.wrap(start, generation, l, r);
                }
            },
            Open::List => {
                self.boundary();
                if !self.in_table() {
                    self.lists.pop();
                }
                if !self
                    .containers
                    .iter()
                    .any(|c| matches!(c, Container::Item { .. }))
                {
                    self.last_in_list = false;
                }
            }
            Open::Item => {
                self.flush();
                if let Some(pos) = self
                    .containers
                    .iter()
                    .rposition(|c| matches!(c, Container::Item { .. }))
                {
                    self.containers.truncate(pos);
                    self.shared_containers = self.shared_containers.min(pos);
                }
            }
            Open::Quote => {
                self.flush();
                if let Some(pos) = self
                    .containers
                    .iter()
                    .rposition(|c| matches!(c, Container::Quote))
                {
                    self.containers.truncate(pos);
                    self.shared_containers = self.shared_containers.min(pos);
                }
            }
            Open::Pre => {
                self.pre = self.pre.saturating_sub(1);
                if self.pre > 0 {
                    return;
                }
                if self.in_table() {
                    self.space();
                    return;
                }
                let buf = std::mem::take(&mut self.pre_buf);
                let code = buf.strip_prefix('\n').unwrap_or(&buf).trim_end();
                if code.trim().is_empty() {
                    return;
                }
                let mut fence = String::from("```");
                while code.contains(fence.as_str()) {
                    fence.push('`');
                }
                let lang = std::mem::take(&mut self.pre_lang);
                self.emit_block(&format!("{fence}{lang}\n{code}\n{fence}"));
            }
            Open::Table => self.end_table(),
            Open::Row => {
                self.end_cell();
                self.end_row();
            }
            Open::Cell => self.end_cell(),
        }
    }

    fn finish(mut self) -> String {
        while let Some(open) = self.stack.pop() {
            self.close(open);
        }
        self.flush();
        let mut out = self.out;
        let l = out.trim_end().len();
        out.truncate(l);
        out.push('\n');
        if out == "\n" {
            out.clear();
        }
        out
    }
}

/// Converts `html` (taken from `base_url`) to Markdown.
pub fn convert(html: &str, base_url: &str) -> String {
    let mut c = Converter::new(base_url);
    for token in Tokenizer::new(html) {
        if c.truncated {
            break;
        }
        match token {
            Token::Start { name, attrs } => c.start(name, attrs),
            Token::End { name } => c.end(&name),
            Token::Text(t) => c.text(&t),
        }
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(html: &str) -> String {
        convert(html, "https://example.com/docs/page.html")
    }

    #[test]
    fn headings_paragraphs_and_inline() {
        assert_eq!(
            md("<h1>Title</h1><p>Some <b>bold</b> and <em> italic </em>text.</p><h2>Sub</h2>"),
            "# Title\n\nSome **bold** and *italic* text.\n\n## Sub\n"
        );
    }

    #[test]
    fn links_are_resolved() {
        assert_eq!(
            md(
                r#"<p>See <a href="../api/x.html#y">the API</a> or <a href="javascript:x()">this</a>.</p>"#
            ),
            "See [the API](https://example.com/api/x.html#y) or this.\n"
        );
    }

    #[test]
    fn nested_lists() {
        assert_eq!(
            md(
                "<ul><li>one<li>two<ul><li>two.a</li></ul></li></ul><ol start=3><li>c</li><li>d</li></ol><p>after</p>"
            ),
            "- one\n- two\n  - two.a\n\n3. c\n4. d\n\nafter\n"
        );
    }

    #[test]
    fn code_blocks_and_inline_code() {
        assert_eq!(
            md(
                "<p>Run <code>ls *</code>:</p><pre><code class=\"language-sh\">ls -l\n  cd /\n</code></pre>"
            ),
            "Run `ls *`:\n\n```sh\nls -l\n  cd /\n```\n"
        );
    }

    #[test]
    fn tables() {
        assert_eq!(
            md(
                "<table><caption>Prices</caption><tr><th>Item</th><th>Cost</th></tr><tr><td>a|b</td><td><p>1</p><p>2</p></td></tr><tr><td>only</td></table>"
            ),
            "Prices\n\n| Item | Cost |\n| --- | --- |\n| a\\|b | 1 2 |\n| only |  |\n"
        );
    }

    #[test]
    fn blockquote_and_escapes() {
        assert_eq!(
            md("<blockquote><p>quoted *text*</p><p>1. not a list</p></blockquote>"),
            "> quoted \\*text\\*\n>\n> 1\\. not a list\n"
        );
    }

    #[test]
    fn skipped_content() {
        assert_eq!(
            md(
                "<head><title>t</title><style>p{}</style></head><body><script>x</script><p hidden>h</p><p>shown</p><noscript>n</noscript></body>"
            ),
            "shown\n"
        );
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let depth = 100_000;
        let html = format!("{}deep{}", "<div>".repeat(depth), "</div>".repeat(depth));
        assert_eq!(md(&html), "deep\n");
        let unclosed = format!("{}x", "<b><i><a href=/x>".repeat(depth));
        let out = md(&unclosed);
        assert!(out.len() < 10_000, "{}", out.len());
    }
}

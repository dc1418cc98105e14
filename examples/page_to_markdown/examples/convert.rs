//! Native preview for capability authors: `cargo run --example convert -- page.html https://base/`.

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(base)) = (args.next(), args.next()) else {
        eprintln!("usage: convert <file.html> <page url>");
        std::process::exit(2);
    };
    let html = std::fs::read(&path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1);
    });
    print!(
        "{}",
        page_to_markdown::markdown::convert(&String::from_utf8_lossy(&html), &base)
    );
}

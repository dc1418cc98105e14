//! `d402 capability …` against the built binary: the operator guide's commands as written,
//! verification, tampering, bad input (exit 2, one line, nothing written), namespace
//! ownership across runs, the store (import, list, corruption) and unsigned registrations.

#![allow(clippy::unwrap_used)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BIN: &str = env!("CARGO_BIN_EXE_d402");
/// A real Solana address (the wrapped SOL mint), for `<CREATOR_SOLANA_WALLET>`.
const SOLANA: &str = "So11111111111111111111111111111111111111112";
const EVM: &str = "0x000000000000000000000000000000000000c0de";
/// A minimal valid module other than the template's placeholder (one custom section).
const MODULE: &[u8] = b"\0asm\x01\0\0\0\x00\x02\x01t";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_in(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    to_run(out)
}

fn to_run(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> Run {
    let r = run_in(dir, args);
    assert_eq!(r.code, 0, "{args:?} failed: {}", r.stderr);
    r
}

/// Runs a command that must fail with exit 2, a one-line `error:` naming `needle`, and no
/// output on stdout.
fn fails(dir: &Path, args: &[&str], needle: &str) -> String {
    let r = run_in(dir, args);
    assert_eq!(
        r.code, 2,
        "{args:?}: expected exit 2, got {}: {}",
        r.code, r.stderr
    );
    assert!(
        r.stdout.is_empty(),
        "{args:?} printed to stdout: {}",
        r.stdout
    );
    let line = r.stderr.trim_end();
    assert!(
        !line.contains('\n'),
        "{args:?}: error is not one line: {line}"
    );
    assert!(line.starts_with("error: "), "{args:?}: {line}");
    assert!(
        line.contains(needle),
        "{args:?}: {line:?} does not name {needle:?}"
    );
    line.to_string()
}

/// Lists every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn template(dir: &Path, id: &str, version: &str, wasm: Option<&str>) -> String {
    let mut args = vec!["capability", "template", "--id", id, "--version", version];
    if let Some(w) = wasm {
        args.extend(["--wasm", w]);
    }
    ok(dir, &args).stdout
}

fn register_args<'a>(file: &'a str, state: &'a str, namespace: &'a str) -> Vec<&'a str> {
    vec![
        "capability",
        "register",
        "--file",
        file,
        "--state",
        state,
        "--namespace",
        namespace,
        "--creator-commission-bps",
        "1000",
        "--creator-solana-wallet",
        SOLANA,
        "--creator-evm-wallet",
        EVM,
    ]
}

#[test]
fn operator_guide_commands_run_as_written_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    // The guide's three commands, word for word, with `d402` as the program and a real
    // Solana address for the placeholder.
    let script = format!(
        r#"d402() {{ "{BIN}" "$@"; }}
d402 capability template --id example.extract_product --version 1 > capability.json
d402 capability validate --file capability.json
d402 capability register \
  --file capability.json \
  --state ./state/publisher \
  --namespace example \
  --creator-commission-bps 1000 \
  --creator-solana-wallet {SOLANA} \
  --creator-evm-wallet 0x000000000000000000000000000000000000c0de \
  > capability.registration.json
"#
    );
    let out = to_run(
        Command::new("sh")
            .args(["-ec", &script])
            .current_dir(dir.path())
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "guide commands failed: {}", out.stderr);
    assert!(
        out.stdout
            .starts_with("valid: example.extract_product@1 manifest bafy")
    );

    // The key: created owner-only, never printed.
    let key_path = dir.path().join("state/publisher/publisher.key");
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secret = fs::read_to_string(&key_path).unwrap().trim().to_string();
    assert_eq!(secret.len(), 64);

    let manifest_json = fs::read_to_string(dir.path().join("capability.json")).unwrap();
    let reg_json = fs::read_to_string(dir.path().join("capability.registration.json")).unwrap();
    let reg: serde_json::Value = serde_json::from_str(&reg_json).unwrap();
    assert!(
        reg["registration_cid"]
            .as_str()
            .unwrap()
            .starts_with("bafy")
    );
    assert_eq!(reg["body"]["creator_commission_bps"], 1000);
    assert_eq!(reg["body"]["namespace"], "example");
    assert_eq!(reg["body"]["capability"]["id"], "example.extract_product");
    assert_eq!(reg["body"]["creator_wallets"]["solana"], SOLANA);
    assert_eq!(reg["body"]["creator_wallets"]["evm"], EVM);
    assert_eq!(reg["body"]["publisher"], reg["signer"]);
    assert!(
        out.stdout
            .contains(reg["body"]["manifest_cid"].as_str().unwrap())
    );

    // The registration verifies, against the manifest too.
    let v = ok(
        dir.path(),
        &[
            "capability",
            "verify",
            "--file",
            "capability.registration.json",
            "--manifest",
            "capability.json",
        ],
    );
    assert!(
        v.stdout.contains("signature     valid, publisher "),
        "{}",
        v.stdout
    );
    assert!(
        v.stdout.contains("commission    1000 bps = 10.00%"),
        "{}",
        v.stdout
    );
    assert!(
        v.stdout.contains("(matches capability.json)"),
        "{}",
        v.stdout
    );
    assert!(
        v.stdout.contains(&format!("wallet        solana {SOLANA}")),
        "{}",
        v.stdout
    );
    assert!(
        v.stdout.contains(&format!("wallet        evm    {EVM}")),
        "{}",
        v.stdout
    );
    let j = ok(
        dir.path(),
        &[
            "capability",
            "verify",
            "--file",
            "capability.registration.json",
            "--json",
        ],
    );
    let terms: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(terms["signed"], true);
    assert_eq!(terms["registration_cid"], reg["registration_cid"]);

    // The secret appears in no output and no other file.
    for text in [
        &out.stdout,
        &out.stderr,
        &v.stdout,
        &v.stderr,
        &j.stdout,
        &manifest_json,
        &reg_json,
    ] {
        assert!(!text.contains(&secret), "the secret key was printed");
    }
    for f in files_under(dir.path()) {
        if f != key_path {
            let bytes = fs::read(&f).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret),
                "secret in {}",
                f.display()
            );
        }
    }

    // Registering again with the same state reuses the key and still owns the namespace.
    let again = ok(
        dir.path(),
        &register_args("capability.json", "./state/publisher", "example"),
    );
    let reg2: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(reg2["signer"], reg["signer"]);
    assert!(!again.stdout.contains(&secret) && !again.stderr.contains(&secret));
}

#[test]
fn tampering_with_any_term_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(
        d.join("m.json"),
        template(d, "example.extract_product", "1", None),
    )
    .unwrap();
    let r = ok(d, &register_args("m.json", "st", "example"));
    let original: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let other_manifest = {
        fs::write(
            d.join("m2.json"),
            template(d, "example.extract_product", "2", None),
        )
        .unwrap();
        let v = ok(d, &["capability", "validate", "--file", "m2.json"]).stdout;
        v.split_whitespace().last().unwrap().to_string()
    };

    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("bps", Box::new(|b| b["creator_commission_bps"] = 1.into())),
        (
            "solana wallet",
            Box::new(|b| {
                b["creator_wallets"]["solana"] =
                    "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v".into()
            }),
        ),
        (
            "evm wallet",
            Box::new(|b| {
                b["creator_wallets"]["evm"] = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into()
            }),
        ),
        (
            "manifest cid",
            Box::new(move |b| b["manifest_cid"] = other_manifest.clone().into()),
        ),
        (
            "namespace",
            Box::new(|b| {
                b["namespace"] = "attacker".into();
                b["capability"]["id"] = "attacker.extract_product".into();
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut doc = original.clone();
        edit(&mut doc["body"]);
        // With the stated CID left alone, the CID check catches it.
        fs::write(d.join("t.json"), doc.to_string()).unwrap();
        fails(
            d,
            &["capability", "verify", "--file", "t.json"],
            "does not match the content",
        );
        // With the CID recomputed by the attacker, the signature catches it: learn the new
        // CID from the error and write it in.
        let line = fails(
            d,
            &["capability", "verify", "--file", "t.json"],
            "registration_cid",
        );
        let new_cid = line.split("hashes to ").nth(1).unwrap().trim().to_string();
        assert_ne!(
            new_cid,
            original["registration_cid"].as_str().unwrap(),
            "{what}: CID unchanged"
        );
        doc["registration_cid"] = new_cid.into();
        fs::write(d.join("t.json"), doc.to_string()).unwrap();
        fails(
            d,
            &["capability", "verify", "--file", "t.json"],
            "signature",
        );
    }
    // Verifying against another manifest fails even when untampered.
    fs::write(d.join("r.json"), &r.stdout).unwrap();
    fails(
        d,
        &[
            "capability",
            "verify",
            "--file",
            "r.json",
            "--manifest",
            "m2.json",
        ],
        "exact manifest CID",
    );
}

#[test]
fn bad_input_exits_2_with_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = template(d, "example.extract_product", "1", None);
    fs::write(d.join("good.json"), &good).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["id"] = "extract_product".into();
    fs::write(d.join("no_ns.json"), v.to_string()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["colour"] = "blue".into();
    fs::write(d.join("unknown.json"), v.to_string()).unwrap();
    fs::write(d.join("malformed.json"), "{ \"format\": 1, ").unwrap();
    fs::write(d.join("a_file"), "not a directory").unwrap();

    let register = |file: &str, extra: &[(&str, &str)]| -> Vec<String> {
        let mut args: Vec<String> = register_args(file, "st", "example")
            .into_iter()
            .map(String::from)
            .collect();
        for (flag, value) in extra {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = value.to_string();
        }
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (register("malformed.json", &[]), "not valid JSON"),
        (register("unknown.json", &[]), "unknown field `colour`"),
        (register("no_ns.json", &[]), "id: "),
        (register("missing.json", &[]), "cannot read missing.json"),
        (
            register("good.json", &[("--creator-commission-bps", "10001")]),
            "--creator-commission-bps 10001 is above 10000",
        ),
        (
            register("good.json", &[("--creator-solana-wallet", "0xabc")]),
            "--creator-solana-wallet",
        ),
        (
            register("good.json", &[("--creator-evm-wallet", "0x1234")]),
            "--creator-evm-wallet",
        ),
        (
            // Mixed case with a wrong EIP-55 checksum.
            register(
                "good.json",
                &[(
                    "--creator-evm-wallet",
                    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD",
                )],
            ),
            "EIP-55",
        ),
        (
            register("good.json", &[("--namespace", "other")]),
            "does not match the manifest id",
        ),
        (
            register("good.json", &[("--namespace", "Bad-NS")]),
            "--namespace",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(d, &args, needle);
        assert!(!d.join("st").exists(), "{args:?} wrote the state dir");
    }
    // validate names the field and rule.
    fails(
        d,
        &["capability", "validate", "--file", "no_ns.json"],
        "id: ",
    );
    fails(
        d,
        &["capability", "validate", "--file", "unknown.json"],
        "colour",
    );
    fs::write(d.join("m.wasm"), MODULE).unwrap();
    fails(
        d,
        &[
            "capability",
            "validate",
            "--file",
            "good.json",
            "--wasm",
            "m.wasm",
        ],
        "implementation.cid",
    );
    fails(
        d,
        &[
            "capability",
            "validate",
            "--file",
            "good.json",
            "--wasm",
            "good.json",
        ],
        "not a Wasm binary",
    );
    fails(
        d,
        &[
            "capability",
            "template",
            "--id",
            "extract_product",
            "--version",
            "1",
        ],
        "namespace.name",
    );

    // A state dir that cannot be written: below a regular file, or a regular file itself.
    let before = files_under(d);
    for state in ["a_file/publisher", "a_file"] {
        let args = register_args("good.json", state, "example");
        fails(d, &args, "a_file");
    }
    // Unwritable by mode (only meaningful when not running as root, which ignores modes).
    let ro = d.join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
    let probe = ro.join("probe");
    if fs::write(&probe, b"x").is_err() {
        fails(
            d,
            &register_args("good.json", "ro/publisher", "example"),
            "ro/publisher",
        );
        fails(d, &register_args("good.json", "ro", "example"), "ro");
        assert!(files_under(&ro).is_empty());
    } else {
        fs::remove_file(&probe).unwrap();
    }
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).unwrap();
    let mut after = files_under(d);
    after.retain(|p| !p.starts_with(&ro));
    assert_eq!(before, after, "a refused command wrote a file");

    // clap usage errors exit 2 as well.
    let r = run_in(d, &["capability", "register", "--state", "st"]);
    assert_eq!(r.code, 2);
    assert!(!d.join("st").exists());
}

#[test]
fn namespace_is_owned_by_the_first_key_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(
        d.join("m.json"),
        template(d, "example.extract_product", "1", None),
    )
    .unwrap();
    ok(d, &register_args("m.json", "pub", "example"));
    let key = d.join("pub/publisher.key");
    let first = fs::read(&key).unwrap();

    // The key gone: refused before a new key is made.
    fs::remove_file(&key).unwrap();
    fails(
        d,
        &register_args("m.json", "pub", "example"),
        "owned by publisher",
    );
    assert!(
        !key.exists(),
        "a key was created for a refused registration"
    );

    // Another key in its place: refused.
    fs::write(&key, format!("{}\n", "11".repeat(32))).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    fails(
        d,
        &register_args("m.json", "pub", "example"),
        "owned by publisher",
    );

    // A key readable by others is refused before anything else.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    fails(
        d,
        &register_args("m.json", "pub", "example"),
        "readable by others",
    );

    // The original key still works; a fork under its own namespace works for anyone.
    fs::write(&key, &first).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    ok(d, &register_args("m.json", "pub", "example"));
    fs::write(
        d.join("fork.json"),
        template(d, "forker.extract_product", "1", None),
    )
    .unwrap();
    ok(d, &register_args("fork.json", "other", "forker"));
    // The registry is per state directory: another publisher's own state knows nothing of
    // "pub", so that conflict is caught where both registrations meet, in a node's store
    // (see import_list_resolve_and_namespace_enforcement_in_the_store). The fork's owner
    // cannot take "example" in the state where "pub"'s registry lives, though:
    fs::copy(
        d.join("pub/capabilities/namespaces.json"),
        d.join("other/capabilities/namespaces.json"),
    )
    .unwrap();
    fails(
        d,
        &register_args("m.json", "other", "example"),
        "owned by publisher",
    );
}

#[test]
fn import_list_resolve_and_namespace_enforcement_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("mod.wasm"), MODULE).unwrap();
    for v in ["1", "2"] {
        fs::write(
            d.join(format!("m{v}.json")),
            template(d, "example.extract_product", v, Some("mod.wasm")),
        )
        .unwrap();
        ok(
            d,
            &[
                "capability",
                "validate",
                "--file",
                &format!("m{v}.json"),
                "--wasm",
                "mod.wasm",
            ],
        );
    }
    let r1 = ok(d, &register_args("m1.json", "alice", "example"));
    fs::write(d.join("r1.json"), &r1.stdout).unwrap();
    // Bob signs terms for version 2 under Alice's namespace with his own key.
    fs::create_dir(d.join("bob")).unwrap();
    let r2 = ok(d, &register_args("m2.json", "bob", "example"));
    fs::write(d.join("r2.json"), &r2.stdout).unwrap();

    let import = |file: &str, reg: Option<&str>| -> Vec<String> {
        let mut a = vec![
            "capability",
            "import",
            "--state",
            "node",
            "--file",
            file,
            "--wasm",
            "mod.wasm",
        ];
        if let Some(r) = reg {
            a.extend(["--registration", r]);
        }
        a.into_iter().map(String::from).collect()
    };
    let args = import("m1.json", Some("r1.json"));
    let out = ok(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.stdout
            .starts_with("imported example.extract_product@1 manifest bafy")
    );

    // Bob's registration is refused by the node's registry: Alice owns "example".
    let args = import("m2.json", Some("r2.json"));
    fails(
        d,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "owned by publisher",
    );
    // A registration for another manifest is refused.
    let args = import("m2.json", Some("r1.json"));
    fails(
        d,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "exact manifest CID",
    );
    // A module that is not the one pinned, or a state that is not a directory: refused,
    // nothing written.
    fs::write(d.join("other.wasm"), b"\0asm\x01\0\0\0\x00\x02\x01u").unwrap();
    fs::write(d.join("a_file"), "x").unwrap();
    let before = files_under(d);
    fails(
        d,
        &[
            "capability",
            "import",
            "--state",
            "n2",
            "--file",
            "m2.json",
            "--wasm",
            "other.wasm",
        ],
        "implementation.cid",
    );
    fails(
        d,
        &[
            "capability",
            "import",
            "--state",
            "a_file",
            "--file",
            "m2.json",
            "--wasm",
            "mod.wasm",
        ],
        "not a directory",
    );
    fails(
        d,
        &[
            "capability",
            "import",
            "--state",
            "a_file/n",
            "--file",
            "m2.json",
            "--wasm",
            "mod.wasm",
        ],
        "a_file/n",
    );
    assert_eq!(before, files_under(d));
    // The manifest alone is fine.
    let args = import("m2.json", None);
    ok(d, &args.iter().map(String::as_str).collect::<Vec<_>>());

    let list = ok(d, &["capability", "list", "--state", "node"]).stdout;
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(
        lines[2].starts_with("web.page_to_markdown@1  manifest bafy")
            && lines[2].ends_with("built-in"),
        "{list}"
    );
    assert!(
        lines[0].starts_with("example.extract_product@1  manifest bafy"),
        "{list}"
    );
    assert!(lines[0].contains("1000 bps, publisher"), "{list}");
    assert!(lines[1].contains("no registration"), "{list}");

    // Corruption is caught on load: list fails and names the file.
    let wasm_files = files_under(&d.join("node/capabilities/wasm"));
    assert_eq!(wasm_files.len(), 1);
    fs::write(&wasm_files[0], b"\0asm\x01\0\0\0\x00\x02\x01u").unwrap();
    let r = run_in(d, &["capability", "list", "--state", "node"]);
    assert_eq!(r.code, 2);
    assert!(r.stdout.contains("FAILED VERIFICATION"), "{}", r.stdout);
    assert!(r.stderr.contains("failed verification"), "{}", r.stderr);

    // An empty store says so.
    let empty = ok(d, &["capability", "list", "--state", "empty"]).stdout;
    assert!(empty.starts_with("no capabilities in "), "{empty}");
    assert!(
        empty.contains("web.page_to_markdown@1  manifest "),
        "{empty}"
    );
    assert!(!d.join("empty").exists(), "list created the state dir");
}

#[test]
fn unsigned_registrations_are_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(
        d.join("m.json"),
        template(d, "example.extract_product", "1", None),
    )
    .unwrap();
    let r = ok(
        d,
        &[
            "capability",
            "register",
            "--file",
            "m.json",
            "--namespace",
            "example",
            "--creator-commission-bps",
            "250",
            "--creator-evm-wallet",
            EVM,
            "--unsigned",
        ],
    );
    assert!(
        r.stderr
            .contains("note: no --creator-solana-wallet: gateways settling on solana-task-escrow"),
        "{}",
        r.stderr
    );
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(doc.get("signature").is_none() && doc.get("signer").is_none());
    assert!(doc["body"].get("publisher").is_none());
    fs::write(d.join("u.json"), &r.stdout).unwrap();
    fails(d, &["capability", "verify", "--file", "u.json"], "unsigned");
    let v = ok(
        d,
        &[
            "capability",
            "verify",
            "--file",
            "u.json",
            "--allow-unsigned",
            "--manifest",
            "m.json",
        ],
    );
    assert!(
        v.stdout
            .contains("signature     none (unsigned registration)")
    );
    assert!(v.stdout.contains("250 bps = 2.50%"));
    // --unsigned never touches a key or state.
    let r = run_in(
        d,
        &[
            "capability",
            "register",
            "--file",
            "m.json",
            "--namespace",
            "example",
            "--state",
            "s",
            "--unsigned",
        ],
    );
    assert_eq!(r.code, 2);
    assert!(!d.join("s").exists());
}

//! `minnow distill synth` with a real (small) teacher: new inputs keep the
//! seeds' shared instruction, are not copies of the seeds or of each other,
//! and a rerun with a higher --count continues the same file.

use std::collections::HashSet;

mod common;

const PREFIX: &str =
    "Extract the order as JSON with keys customer, product, quantity, unit_price, city, delivery_date.\n\nMessage: ";

#[test]
fn synth_writes_new_distinct_inputs_and_continues_on_rerun() {
    let model = common::smollm2();
    let dir = common::scratch_dir("distill-synth", "run");
    let seeds = [
        "Liam Okafor here. For the Osaka team we'd like 12 whiteboards at 79 USD apiece, delivery 2025-06-07.",
        "Dear sales, we confirm the purchase of ten standing desks (489.9 USD each). Deliver to Kazan on 01/07/2026. Best, Hana Patel",
        "Order request from Anna Haddad (Kazan branch): five x paper shredder, unit price $35.00, delivery by 10/07/2025.",
        "Hi, this is Jonas Schmidt. Please send 4 wireless mouses at $310.00 each to Prague by the 12th of December 2025.",
    ];
    let seeds_path = dir.join("seeds.jsonl");
    let text: String =
        seeds.iter().map(|s| serde_json::json!({"prompt": format!("{PREFIX}{s}")}).to_string() + "\n").collect();
    std::fs::write(&seeds_path, text).unwrap();
    let out = dir.join("new.jsonl");
    let synth = |count: &str| {
        let o = common::minnow_cmd()
            .args(["distill", "synth", "--task", "customer messages ordering office products"])
            .arg("--seeds")
            .arg(&seeds_path)
            .arg("-o")
            .arg(&out)
            .args(["--count", count, "--teacher"])
            .arg(&model)
            .args(["--max-tokens", "60", "--parallel", "4", "-t", "2", "--seed", "7"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.ends_with('\n'));
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let first = synth("2");
    assert_eq!(first.len(), 2);
    let second = synth("4");
    assert_eq!(second.len(), 4);
    assert_eq!(second[..2], first[..], "a rerun keeps what was there and appends");
    let mut bodies = HashSet::new();
    for r in &second {
        let p = r["prompt"].as_str().unwrap();
        let body = p.strip_prefix(PREFIX).unwrap_or_else(|| panic!("the shared instruction was lost: {p:?}"));
        assert!(body.trim().len() >= 20, "shorter than --min-chars: {body:?}");
        assert!(!seeds.iter().any(|s| s.eq_ignore_ascii_case(body.trim())), "a seed came back: {body:?}");
        assert!(bodies.insert(body.to_lowercase()), "duplicate: {body:?}");
    }
    let ids: HashSet<&str> = second.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4);
}

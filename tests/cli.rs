//! The CLI contract of DESIGN.md, exercised through the real binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

use pilotlight::{
    assert_same_bytes, fails, file_len, ok, overwrite_random_4k, run_bin, sample_image,
    spawn_receiver,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn replicate_list_restore_and_refuse_through_the_binaries() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("rcv");
    let id = root.join("web1.pem");
    ok(&run_bin(
        "pilotlight-receiver",
        &["init", "--dir", s(&dir), "--listen", "127.0.0.1:0"],
    ));
    ok(&run_bin(
        "pilotlight-receiver",
        &[
            "enroll",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--out",
            s(&id),
        ],
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&id).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let img = root.join("web1.img");
    sample_image(&img, 8 << 20, 11);
    let (_rx, addr) = spawn_receiver(&dir);
    let addr = addr.to_string();
    let state = root.join("state");
    let agent = |img: &Path| {
        let vol = format!("root={}", s(img));
        run_bin(
            "pilotlight-agent",
            &[
                "run",
                "--receiver",
                &addr,
                "--identity",
                s(&id),
                "--state",
                s(&state),
                "--volume",
                &vol,
                "--once",
            ],
        )
    };
    let p1: i64 = ok(&agent(&img))
        .trim()
        .parse()
        .expect("--once prints the point id");
    let v1 = root.join("v1.img");
    std::fs::copy(&img, &v1).unwrap();
    overwrite_random_4k(&img, 10, 3);
    let p2: i64 = ok(&agent(&img)).trim().parse().unwrap();
    assert!(p2 > p1);

    let json: serde_json::Value = serde_json::from_str(&ok(&run_bin(
        "pilotlight-receiver",
        &["points", "--dir", s(&dir), "--json"],
    )))
    .unwrap();
    let pts = json.as_array().unwrap();
    assert_eq!(pts.len(), 2);
    for p in pts {
        for key in [
            "id",
            "server",
            "created",
            "consistency",
            "commit",
            "volumes",
        ] {
            assert!(p.get(key).is_some(), "point lacks {key}: {p}");
        }
        assert_eq!(p["server"], "web1");
        assert_eq!(p["commit"], "sync");
        assert!(["fuzzy", "crash-consistent"].contains(&p["consistency"].as_str().unwrap()));
        let created = p["created"].as_str().unwrap();
        assert!(
            created.contains('T') && (created.ends_with('Z') || created.contains('+')),
            "{created}"
        );
        let v = &p["volumes"][0];
        assert_eq!(v["name"], "root");
        assert_eq!(v["size"], 8 << 20);
        assert!(v["changed_bytes"].as_u64().unwrap() > 0);
    }
    assert!(pts[1]["volumes"][0]["changed_bytes"].as_u64().unwrap() <= 10 * 65536);

    let out = root.join("out.img");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--volume",
            "root",
        ];
        args.extend_from_slice(extra);
        run_bin("pilotlight-receiver", &args)
    };
    let p1s = p1.to_string();
    ok(&restore(&["--point", &p1s, "--to", s(&out)]));
    assert_same_bytes(&out, &v1, file_len(&v1));
    // An existing target is refused without --force, and left alone.
    fails(&restore(&["--latest", "--to", s(&out)]), "--force");
    assert_same_bytes(&out, &v1, file_len(&v1));
    ok(&restore(&["--latest", "--to", s(&out), "--force"]));
    assert_same_bytes(&out, &img, file_len(&img));
    // --at picks the latest point at or before the time.
    let created1 = pts[0]["created"].as_str().unwrap().to_owned();
    let out_at = root.join("at.img");
    ok(&restore(&["--at", &created1, "--to", s(&out_at)]));
    assert_same_bytes(&out_at, &v1, file_len(&v1));
    fails(
        &restore(&["--at", "2001-01-01T00:00:00Z", "--to", s(&root.join("x"))]),
        "no point at or before",
    );

    // Unknown point, server and volume: one clear sentence, non-zero exit.
    fails(
        &restore(&["--point", "999", "--to", s(&root.join("x"))]),
        "has no point 999",
    );
    let args = [
        "restore",
        "--dir",
        s(&dir),
        "--server",
        "nosuch",
        "--volume",
        "root",
        "--latest",
        "--to",
        "x",
    ];
    fails(
        &run_bin("pilotlight-receiver", &args),
        "no server named nosuch",
    );
    let args = [
        "restore",
        "--dir",
        s(&dir),
        "--server",
        "web1",
        "--volume",
        "swap",
        "--latest",
        "--to",
        "x",
    ];
    fails(
        &run_bin("pilotlight-receiver", &args),
        "has no volume named swap",
    );
    assert!(!root.join("x").exists());

    let verify = run_bin(
        "pilotlight-receiver",
        &["verify", "--dir", s(&dir), "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&verify)).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["points_checked"], 2);
}

#[test]
fn bad_arguments_fail_with_one_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nothing");
    fails(
        &run_bin("pilotlight-receiver", &["points", "--dir", s(&dir)]),
        "not a receiver directory",
    );
    let args = [
        "run",
        "--receiver",
        "127.0.0.1:1",
        "--identity",
        "/nonexistent.pem",
        "--state",
        "st",
        "--volume",
        "r=/dev/null",
        "--once",
    ];
    fails(&run_bin("pilotlight-agent", &args), "cannot read identity");
}

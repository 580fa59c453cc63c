//! Off-host history in S3-compatible object storage (issue 18), through the
//! real binaries over TLS on 127.0.0.1, against a real moto S3 server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};
use pilotlight::{
    assert_same_bytes, bin, fails, file_len, ok, overwrite_random_4k, require_tools, sample_image,
    ChildGuard, Deadline, Moto,
};

const BUCKET: &str = "dr-history";
/// Written into the source image between random bytes: found verbatim in a
/// local pack (zstd cannot shrink its block), never in the bucket.
const MARKER: &[u8] = b"PILOTLIGHT-PLAINTEXT-MARKER-7f3a9c1e";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pilotlight-receiver ARGS` with moto's AWS environment.
fn receiver(moto: &Moto, args: &[&str]) -> Output {
    Command::new(bin("pilotlight-receiver"))
        .args(args)
        .envs(moto.env())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pilotlight-receiver")
}

/// `serve` with moto's environment; returns it and its address.
fn serve(moto: &Moto, dir: &Path) -> (ChildGuard, String) {
    serve_with(moto, dir, &[])
}

/// `serve` with moto's environment and `env`.
fn serve_with(moto: &Moto, dir: &Path, env: &[(&str, &str)]) -> (ChildGuard, String) {
    use std::io::BufRead;
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--print-addr", "--dir"])
        .arg(dir)
        .envs(moto.env())
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    assert!(!line.trim().is_empty(), "serve printed no address");
    (guard, line.trim().to_owned())
}

/// Stop `serve` with SIGTERM (it takes its last catalog snapshot) and wait.
fn stop(mut rx: ChildGuard) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(rx.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = rx.0.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

fn agent(addr: &str, id: &Path, state: &Path, img: &Path) -> Command {
    let mut c = Command::new(bin("pilotlight-agent"));
    c.args([
        "run",
        "--receiver",
        addr,
        "--identity",
        s(id),
        "--state",
        s(state),
    ])
    .arg("--volume")
    .arg(format!("root={}", s(img)))
    .arg("--once")
    .env("RUST_LOG", "warn");
    c
}

/// A receiver directory with a store, and one enrolled server, `web1`.
fn init(moto: &Moto, root: &Path, prefix: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = root.join("rcv");
    let url = format!("s3://{BUCKET}/{prefix}");
    let out = ok(&receiver(
        moto,
        &[
            "init",
            "--dir",
            s(&dir),
            "--listen",
            "127.0.0.1:0",
            "--store",
            &url,
        ],
    ));
    assert!(
        out.contains("offline"),
        "init says to keep the key offline: {out}"
    );
    let id = root.join("web1.pem");
    ok(&receiver(
        moto,
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
    (dir, id)
}

/// Every object under `prefix`: name and bytes.
fn bucket_objects(moto: &Moto, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let store = s3(moto);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = object_store::path::Path::from(prefix);
        let mut out = Vec::new();
        let metas: Vec<_> = store.list(Some(&p)).collect().await;
        for m in metas {
            let m = m.unwrap();
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), bytes.to_vec()));
        }
        out.sort();
        out
    })
}

fn s3(moto: &Moto) -> object_store::aws::AmazonS3 {
    AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap()
}

fn put_object(moto: &Moto, name: &str, bytes: Vec<u8>) {
    let store = s3(moto);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.put(&object_store::path::Path::from(name), bytes.into()))
        .unwrap();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Write the marker into blocks of `img`, between random bytes.
fn write_markers(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    for i in 0..8u64 {
        f.write_all_at(MARKER, i * (1 << 20) + 1000).unwrap();
    }
}

#[test]
#[ignore = "needs moto_server"]
fn a_new_host_rebuilds_from_the_bucket_and_restores_both_points_byte_exact() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-a");
    use std::os::unix::fs::PermissionsExt;
    let key_meta = std::fs::metadata(dir.join("store.key")).unwrap();
    assert_eq!(key_meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(key_meta.len(), 32);
    let key_copy = root.join("offline.key");
    std::fs::copy(dir.join("store.key"), &key_copy).unwrap();

    let img = root.join("web1.img");
    sample_image(&img, 8 << 20, 21);
    write_markers(&img);
    let (rx, addr) = serve(&moto, &dir);
    let state = root.join("state");
    let p1 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .to_owned();
    let v1 = root.join("v1.img");
    std::fs::copy(&img, &v1).unwrap();
    overwrite_random_4k(&img, 20, 5);
    let p2 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .to_owned();
    stop(rx);

    // The check below means something: the local packs hold the marker.
    let packs: Vec<u8> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(contains(&packs, MARKER), "the marker is in the local packs");
    let objects = bucket_objects(&moto, "site-a");
    assert!(
        objects.iter().any(|(n, _)| n.ends_with(".seg")),
        "{objects:?}"
    );
    assert!(objects.iter().any(|(n, _)| n == "site-a/catalog/manifest"));
    for (name, bytes) in &objects {
        assert!(!contains(bytes, MARKER), "{name} holds plaintext");
        assert!(
            !contains(bytes, b"SQLite format"),
            "{name} holds a plain catalog"
        );
    }

    // The staging host is lost.
    std::fs::remove_dir_all(&dir).unwrap();
    let url = format!("s3://{BUCKET}/site-a");
    let new = root.join("rcv2");
    fails(
        &receiver(&moto, &["rebuild", "--dir", s(&new), "--store", &url]),
        "needs the store key",
    );
    let wrong = root.join("wrong.key");
    std::fs::write(&wrong, [7u8; 32]).unwrap();
    fails(
        &receiver(
            &moto,
            &[
                "rebuild",
                "--dir",
                s(&new),
                "--store",
                &url,
                "--key",
                s(&wrong),
            ],
        ),
        "does not open the store",
    );
    std::fs::remove_dir_all(&new).ok();
    let out = ok(&receiver(
        &moto,
        &[
            "rebuild",
            "--dir",
            s(&new),
            "--store",
            &url,
            "--key",
            s(&key_copy),
        ],
    ));
    assert!(out.contains("2 points"), "{out}");

    let r1 = root.join("r1.img");
    let r2 = root.join("r2.img");
    let rebuilt = |args: &[&str]| {
        Command::new(bin("pilotlight-receiver"))
            .args(args)
            .envs(moto.env())
            .output()
            .unwrap()
    };
    ok(&rebuilt(&[
        "restore",
        "--dir",
        s(&new),
        "--server",
        "web1",
        "--volume",
        "root",
        "--point",
        &p1,
        "--to",
        s(&r1),
    ]));
    ok(&rebuilt(&[
        "restore",
        "--dir",
        s(&new),
        "--server",
        "web1",
        "--volume",
        "root",
        "--point",
        &p2,
        "--to",
        s(&r2),
    ]));
    assert_same_bytes(&r1, &v1, file_len(&v1));
    assert_same_bytes(&r2, &img, file_len(&img));

    // A damaged object: verify (cold cache) names it.
    let (seg, bytes) = objects
        .iter()
        .find(|(n, _)| n.ends_with(".seg"))
        .cloned()
        .unwrap();
    let mut bad = bytes;
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    put_object(&moto, &seg, bad);
    for e in std::fs::read_dir(new.join("packs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let verify = rebuilt(&["verify", "--dir", s(&new)]);
    assert!(!verify.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let short = seg.strip_prefix("site-a/").unwrap();
    assert!(text.contains(short), "verify names {short}: {text}");
    // Nothing of another prefix was touched.
    assert!(bucket_objects(&moto, "site-b").is_empty());
}

#[test]
#[ignore = "needs moto_server"]
fn a_point_waits_for_the_store_and_is_durable_once_it_is_back() {
    require_tools(&["moto_server"]);
    let mut moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-b");
    let img = root.join("web1.img");
    sample_image(&img, 4 << 20, 22);
    let (rx, addr) = serve(&moto, &dir);
    let status = |m: &Moto| ok(&receiver(m, &["status", "--dir", s(&dir)]));
    // serve checks the bucket before it takes points.
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(100));
    while !status(&moto).contains(": ok") {
        deadline.next_blocking(|| format!("serve never checked the store: {}", status(&moto)));
    }
    moto.stop();
    let mut agent = agent(&addr, &id, &root.join("state"), &img)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(200));
    while !status(&moto).contains("UNREACHABLE") {
        deadline.next_blocking(|| format!("status never showed the store down: {}", status(&moto)));
    }
    assert!(
        agent.try_wait().unwrap().is_none(),
        "no DURABLE while the store is down"
    );
    let points = ok(&receiver(&moto, &["points", "--dir", s(&dir), "--json"]));
    let points: serde_json::Value = serde_json::from_str(&points).unwrap();
    assert_eq!(points.as_array().map(Vec::len), Some(0), "{points}");

    moto.restart();
    moto.create_bucket(BUCKET);
    let deadline = Deadline::after(Duration::from_secs(120)).every(Duration::from_millis(100));
    let exit = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st;
        }
        deadline.next_blocking(|| "the point never became durable".into());
    };
    assert!(exit.success());
    let points = ok(&receiver(&moto, &["points", "--dir", s(&dir), "--json"]));
    let points: serde_json::Value = serde_json::from_str(&points).unwrap();
    assert_eq!(points.as_array().map(Vec::len), Some(1), "{points}");
    assert!(!status(&moto).contains("UNREACHABLE"));
    stop(rx);
}

#[test]
#[ignore = "needs moto_server"]
fn a_missing_bucket_or_an_unreachable_store_is_one_sentence() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("rcv");
    let init = |url: &str| {
        receiver(
            &moto,
            &[
                "init",
                "--dir",
                s(&dir),
                "--listen",
                "127.0.0.1:0",
                "--store",
                url,
            ],
        )
    };
    fails(&init("s3://no-such-bucket/x"), "does not exist");
    assert!(!dir.exists(), "a failed check writes nothing");
    fails(&init("http://x/y"), "not an object store URL");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = Command::new(bin("pilotlight-receiver"))
        .args(["init", "--dir", s(&dir), "--store", "s3://b/x"])
        .envs(moto.env())
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    fails(&out, "cannot reach the object store");

    // serve checks too: the bucket went away after init.
    moto.create_bucket(BUCKET);
    let url = format!("s3://{BUCKET}/p");
    ok(&init(&url));
    let out = Command::new(bin("pilotlight-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--dir", s(&dir)])
        .envs(moto.env())
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    fails(&out, "cannot reach the object store");
}

/// The pack ids the bucket holds segments of, under `prefix`.
fn packs_in_bucket(moto: &Moto, prefix: &str) -> std::collections::BTreeSet<String> {
    bucket_objects(moto, prefix)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".seg"))
        .map(|(n, _)| n.split('/').nth(2).unwrap().to_owned())
        .collect()
}

#[test]
#[ignore = "needs moto_server"]
fn gc_deletes_the_objects_of_the_packs_it_removes_and_what_stays_restores_cold() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-c");
    // No minimum history, so that `prune --keep-last 1` prunes point 1.
    let cfg_path = dir.join("receiver.toml");
    let mut cfg: toml::Table = std::fs::read_to_string(&cfg_path).unwrap().parse().unwrap();
    let retention = cfg
        .entry("retention")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    retention
        .as_table_mut()
        .unwrap()
        .insert("min_keep".into(), toml::Value::String("0s".into()));
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();

    let img = root.join("web1.img");
    sample_image(&img, 4 << 20, 31);
    let (rx, addr) = serve(&moto, &dir);
    let state = root.join("state");
    ok(&agent(&addr, &id, &state, &img).output().unwrap());
    // Every block differs in point 2: point 1's blocks are all garbage.
    sample_image(&img, 4 << 20, 32);
    let p2 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .to_owned();
    stop(rx);
    let before = packs_in_bucket(&moto, "site-c");
    assert!(!before.is_empty());

    ok(&receiver(
        &moto,
        &[
            "prune",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--keep-last",
            "1",
        ],
    ));
    let after = packs_in_bucket(&moto, "site-c");
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        !removed.is_empty(),
        "gc removed a pack's objects: {before:?} -> {after:?}"
    );
    for pack in &removed {
        assert!(
            !dir.join("packs").join(format!("{pack}.pack")).exists(),
            "only the objects of packs gc removed go"
        );
    }
    // What stays is whole: from a cold cache, and from a rebuilt directory.
    for e in std::fs::read_dir(dir.join("packs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let out = root.join("p2.img");
    ok(&receiver(
        &moto,
        &[
            "restore",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--volume",
            "root",
            "--point",
            &p2,
            "--to",
            s(&out),
        ],
    ));
    assert_same_bytes(&out, &img, file_len(&img));
    let key = dir.join("store.key");
    let new = root.join("rcv2");
    let url = format!("s3://{BUCKET}/site-c");
    let text = ok(&receiver(
        &moto,
        &[
            "rebuild",
            "--dir",
            s(&new),
            "--store",
            &url,
            "--key",
            s(&key),
        ],
    ));
    assert!(text.contains("1 points"), "{text}");
    let v = ok(&receiver(&moto, &["verify", "--dir", s(&new), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

/// Set `[section] key = value` in the receiver.toml of `dir`.
fn set_config(dir: &Path, section: &str, key: &str, value: toml::Value) {
    let path = dir.join("receiver.toml");
    let mut cfg: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    cfg.entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value);
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
}

/// The point ids `points --json` lists in `dir`.
fn point_ids(moto: &Moto, dir: &Path) -> Vec<i64> {
    let text = ok(&receiver(moto, &["points", "--dir", s(dir), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect()
}

/// Restore point `id` of web1's `root` from `dir` to `out`.
fn restore(moto: &Moto, dir: &Path, id: i64, out: &Path) {
    let id = id.to_string();
    ok(&receiver(
        moto,
        &[
            "restore",
            "--dir",
            s(dir),
            "--server",
            "web1",
            "--volume",
            "root",
            "--point",
            &id,
            "--to",
            s(out),
        ],
    ));
}

/// `rebuild` of `new` from `prefix` with the key `key`; its output.
fn rebuild(moto: &Moto, new: &Path, prefix: &str, key: &Path) -> String {
    let url = format!("s3://{BUCKET}/{prefix}");
    ok(&receiver(
        moto,
        &["rebuild", "--dir", s(new), "--store", &url, "--key", s(key)],
    ))
}

#[test]
#[ignore = "needs moto_server"]
fn points_and_prunes_after_the_last_snapshot_are_in_a_rebuild() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-j");
    // Snapshots are rare: one when serve first commits (and at shutdown),
    // then none for an hour.
    set_config(&dir, "store", "snapshot_secs", toml::Value::Integer(3600));
    set_config(
        &dir,
        "retention",
        "min_keep",
        toml::Value::String("0s".into()),
    );
    let key = root.join("offline.key");
    std::fs::copy(dir.join("store.key"), &key).unwrap();
    let img = root.join("web1.img");
    let state = root.join("state");
    sample_image(&img, 4 << 20, 41);
    let (rx, addr) = serve(&moto, &dir);
    let p1: i64 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .parse()
        .unwrap();
    stop(rx); // the shutdown snapshot has point 1

    let (rx, addr) = serve(&moto, &dir);
    // Every block differs: point 1's blocks are garbage once it is pruned.
    sample_image(&img, 4 << 20, 42);
    let p2: i64 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .parse()
        .unwrap();
    let v2 = root.join("v2.img");
    std::fs::copy(&img, &v2).unwrap();
    overwrite_random_4k(&img, 10, 43);
    let p3: i64 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .parse()
        .unwrap();
    drop(rx); // kill -9: no snapshot after point 1's
    let before = packs_in_bucket(&moto, "site-j");
    ok(&receiver(
        &moto,
        &[
            "prune",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--keep-last",
            "2",
        ],
    ));
    let after = packs_in_bucket(&moto, "site-j");
    assert!(
        before.difference(&after).next().is_some(),
        "gc deleted the objects of point 1's packs: {before:?} -> {after:?}"
    );
    assert_eq!(point_ids(&moto, &dir), vec![p2, p3]);

    std::fs::remove_dir_all(&dir).unwrap();
    let new = root.join("rcv2");
    let out = rebuild(&moto, &new, "site-j", &key);
    assert!(out.contains("2 points"), "{out}");
    assert!(!out.contains(" 0 journal records"), "{out}");
    assert_eq!(
        point_ids(&moto, &new),
        vec![p2, p3],
        "point {p1} was pruned"
    );
    for (p, want) in [(p2, &v2), (p3, &img)] {
        let got = root.join(format!("r{p}.img"));
        restore(&moto, &new, p, &got);
        assert_same_bytes(&got, want, file_len(want));
    }
    let v = ok(&receiver(&moto, &["verify", "--dir", s(&new), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
#[ignore = "needs moto_server"]
fn a_kill_after_the_journal_record_and_before_the_ack_leaves_a_rebuild_that_opens() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-k");
    let img = root.join("web1.img");
    let state = root.join("state");
    sample_image(&img, 4 << 20, 51);
    let (rx, addr) = serve(&moto, &dir);
    let p1: i64 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .parse()
        .unwrap();
    stop(rx);
    let v1 = root.join("v1.img");
    std::fs::copy(&img, &v1).unwrap();

    overwrite_random_4k(&img, 20, 52);
    let (mut rx, addr) = serve_with(&moto, &dir, &[("PILOTLIGHT_TEST_KILL_AFTER_JOURNAL", "1")]);
    let _agent = ChildGuard(
        agent(&addr, &id, &state, &img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Deadline::after(Duration::from_secs(120)).every(Duration::from_millis(100));
    let status = loop {
        if let Some(st) = rx.0.try_wait().unwrap() {
            break st;
        }
        deadline.next_blocking(|| "the receiver never reached the crash point".into());
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed at the crash point");
    drop(_agent);

    let new = root.join("rcv2");
    let out = rebuild(&moto, &new, "site-k", &dir.join("store.key"));
    assert!(
        out.contains("2 points"),
        "the unacknowledged point is there too: {out}"
    );
    let ids = point_ids(&moto, &new);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], p1);
    for (p, want) in [(ids[0], &v1), (ids[1], &img)] {
        let got = root.join(format!("r{p}.img"));
        restore(&moto, &new, p, &got);
        assert_same_bytes(&got, want, file_len(want));
    }
    // The old directory serves again, and its next commits journal on.
    let (rx, addr) = serve(&moto, &dir);
    ok(&agent(&addr, &id, &state, &img).output().unwrap());
    stop(rx);
}

#[test]
#[ignore = "needs moto_server"]
fn commands_that_need_the_store_give_up_in_bounded_time_with_one_sentence() {
    require_tools(&["moto_server"]);
    let mut moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (dir, id) = init(&moto, root, "site-d");
    set_config(&dir, "store", "command_wait_secs", toml::Value::Integer(3));
    set_config(
        &dir,
        "retention",
        "min_keep",
        toml::Value::String("0s".into()),
    );
    let img = root.join("web1.img");
    let state = root.join("state");
    sample_image(&img, 2 << 20, 61);
    let (rx, addr) = serve(&moto, &dir);
    ok(&agent(&addr, &id, &state, &img).output().unwrap());
    sample_image(&img, 2 << 20, 62);
    let p2 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .to_owned();
    stop(rx);
    // A cold cache: every read needs the bucket.
    for e in std::fs::read_dir(dir.join("packs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    moto.stop();
    let out = root.join("p2.img");
    let key = dir.join("store.key");
    let url = format!("s3://{BUCKET}/site-d");
    let new = root.join("rcv2");
    // prune's own work is local: it prunes, and says the space waits.
    let started = std::time::Instant::now();
    let o = receiver(
        &moto,
        &[
            "prune",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--keep-last",
            "1",
        ],
    );
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("space not collected now: cannot reach the object store"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let commands: [Vec<&str>; 4] = [
        vec![
            "restore",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--volume",
            "root",
            "--point",
            &p2,
            "--to",
            s(&out),
        ],
        vec!["verify", "--dir", s(&dir)],
        // The prune's catalog changes wait in the journal: gc ships them.
        vec!["gc", "--dir", s(&dir)],
        vec![
            "rebuild",
            "--dir",
            s(&new),
            "--store",
            &url,
            "--key",
            s(&key),
        ],
    ];
    for args in &commands {
        let started = std::time::Instant::now();
        let o = receiver(&moto, args);
        let took = started.elapsed();
        fails(&o, "cannot reach the object store");
        assert!(took < Duration::from_secs(60), "{args:?} took {took:?}");
    }
    // status reads the directory only.
    let text = ok(&receiver(&moto, &["status", "--dir", s(&dir)]));
    assert!(text.contains("object store"), "{text}");
}

/// The bucket with S3 Object Lock (a default retention of one day).
const LOCKED: &str = "dr-locked";

/// A request to moto signed with the receiver's credentials (moto's AWS
/// environment): its status line and body.
fn signed(moto: &Moto, method: &str, path: &str) -> (String, String) {
    use object_store::aws::{AwsAuthorizer, AwsCredential};
    use object_store::client::{HttpRequest, HttpRequestBody};
    let mut req = HttpRequest::new(HttpRequestBody::empty());
    *req.method_mut() = method.parse().unwrap();
    *req.uri_mut() = format!("{}{path}", moto.endpoint()).parse().unwrap();
    let cred = AwsCredential {
        key_id: "testing".into(),
        secret_key: "testing".into(),
        token: None,
    };
    AwsAuthorizer::new(&cred, "s3", "us-east-1")
        .try_authorize(&mut req, None)
        .unwrap();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    moto.call(method, path, &headers, b"")
        .expect("moto answers")
}

/// The text of the first `<tag>` in `xml`.
fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..start + len])
}

/// The names of the objects in `bucket` under `prefix`.
fn names_in(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let store = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = object_store::path::Path::from(prefix);
    let mut names: Vec<String> = rt
        .block_on(store.list(Some(&p)).collect::<Vec<_>>())
        .into_iter()
        .map(|m| m.unwrap().location.to_string())
        .collect();
    names.sort();
    names
}

/// The packs that have segments in `bucket` under `prefix`.
fn packs_of(moto: &Moto, bucket: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    names_in(moto, bucket, prefix)
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .map(|n| n.split('/').nth(2).unwrap().to_owned())
        .collect()
}

/// `init --store s3://BUCKET/site-l --object-lock-days DAYS` of `dir`.
fn init_locked(moto: &Moto, dir: &Path, bucket: &str, days: u32) -> Output {
    let url = format!("s3://{bucket}/site-l");
    let days = days.to_string();
    receiver(
        moto,
        &[
            "init",
            "--dir",
            s(dir),
            "--listen",
            "127.0.0.1:0",
            "--store",
            &url,
            "--object-lock-days",
            &days,
        ],
    )
}

/// Rows of `store_deferred` in the catalog of `dir`.
fn deferred_rows(dir: &Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("catalog.db")).unwrap();
    db.query_row("SELECT count(*) FROM store_deferred", [], |r| r.get(0))
        .unwrap()
}

#[test]
#[ignore = "needs moto_server and faketime"]
fn object_lock_keeps_what_gc_removed_until_its_retention_ends() {
    require_tools(&["moto_server", "faketime"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    moto.create_locked_bucket(LOCKED, 1);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // A bucket whose lock does not cover the days, or that has none: one
    // sentence, and no directory.
    let short = root.join("short");
    fails(
        &init_locked(&moto, &short, LOCKED, 2),
        "has a default retention of only 1 days, but [store] object_lock_days = 2 needs S3 Object Lock",
    );
    let unlocked = root.join("unlocked");
    fails(
        &init_locked(&moto, &unlocked, BUCKET, 1),
        "has no Object Lock, but [store] object_lock_days = 1 needs",
    );
    assert!(!short.exists() && !unlocked.exists());

    let dir = root.join("rcv");
    ok(&init_locked(&moto, &dir, LOCKED, 1));
    let id = root.join("web1.pem");
    ok(&receiver(
        &moto,
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
    set_config(
        &dir,
        "retention",
        "min_keep",
        toml::Value::String("0s".into()),
    );
    let img = root.join("web1.img");
    let state = root.join("state");
    sample_image(&img, 4 << 20, 71);
    let (rx, addr) = serve(&moto, &dir);
    ok(&agent(&addr, &id, &state, &img).output().unwrap());
    // Every block differs in point 2: point 1's packs are all garbage.
    sample_image(&img, 4 << 20, 72);
    let p2 = ok(&agent(&addr, &id, &state, &img).output().unwrap())
        .trim()
        .to_owned();
    stop(rx);

    // Every object the receiver wrote is locked for the bucket's day.
    let names = names_in(&moto, LOCKED, "site-l");
    assert!(names.iter().any(|n| n.ends_with(".seg")), "{names:?}");
    let in_23h = pilotlight_protocol::clock::now_ms() + 23 * 3_600_000;
    for n in &names {
        // HeadObject: ObjectLockMode and ObjectLockRetainUntilDate.
        let (head, _) = signed(&moto, "HEAD", &format!("/{LOCKED}/{n}"));
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
                .unwrap_or_else(|| panic!("{n}: no {name}: {head}"))
        };
        assert!(head.starts_with("HTTP/1.1 200"), "{n}: {head}");
        assert_eq!(header("x-amz-object-lock-mode"), "COMPLIANCE", "{n}");
        let until = header("x-amz-object-lock-retain-until-date");
        let until = pilotlight_protocol::clock::parse_rfc3339(&until)
            .unwrap_or_else(|| panic!("{n}: {until}"));
        assert!(until > in_23h, "{n} is locked for a day: {head}");
    }

    // Prune and collect: the removed packs' objects stay while locked, and
    // the point left restores from a cold cache.
    let before = packs_of(&moto, LOCKED, "site-l");
    ok(&receiver(
        &moto,
        &[
            "prune",
            "--dir",
            s(&dir),
            "--server",
            "web1",
            "--keep-last",
            "1",
        ],
    ));
    assert!(deferred_rows(&dir) > 0, "gc removed packs, and waits");
    // (A pack it rewrote may have added one.)
    let kept = packs_of(&moto, LOCKED, "site-l");
    assert!(
        before.is_subset(&kept),
        "no locked object deleted: {before:?} -> {kept:?}"
    );
    for e in std::fs::read_dir(dir.join("packs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let out = root.join("p2.img");
    restore(&moto, &dir, p2.parse().unwrap(), &out);
    assert_same_bytes(&out, &img, file_len(&img));

    // The receiver's own credentials cannot delete a locked version.
    let (_, versions) = signed(
        &moto,
        "GET",
        &format!("/{LOCKED}?versions&prefix=site-l/packs/"),
    );
    let first = xml_tag(&versions, "Version").unwrap_or_else(|| panic!("{versions}"));
    let (key, version) = (
        xml_tag(first, "Key").unwrap(),
        xml_tag(first, "VersionId").unwrap(),
    );
    let (status, body) = signed(
        &moto,
        "DELETE",
        &format!("/{LOCKED}/{key}?versionId={version}"),
    );
    assert!(
        status.starts_with("HTTP/1.1 403") && body.contains("AccessDenied"),
        "{status} {body}"
    );
    let (head, _) = signed(&moto, "HEAD", &format!("/{LOCKED}/{key}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{key} is still there: {head}"
    );

    // A rebuilt directory knows what is still locked.
    let new = root.join("rcv2");
    let url = format!("s3://{LOCKED}/site-l");
    let key = dir.join("store.key");
    let text = ok(&receiver(
        &moto,
        &[
            "rebuild",
            "--dir",
            s(&new),
            "--store",
            &url,
            "--key",
            s(&key),
        ],
    ));
    assert!(text.contains("1 points"), "{text}");
    assert_eq!(deferred_rows(&new), deferred_rows(&dir));

    // Two days on (the receiver's clock, by faketime), they are due: its
    // next collection deletes them.
    let o = Command::new("faketime")
        .args(["-f", "+2d"])
        .arg(bin("pilotlight-receiver"))
        .args(["gc", "--dir", s(&new)])
        .envs(moto.env())
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    ok(&o);
    let after = packs_of(&moto, LOCKED, "site-l");
    assert!(
        after.len() < kept.len() && after.is_subset(&kept),
        "due objects deleted: {kept:?} -> {after:?}"
    );
    assert_eq!(deferred_rows(&new), 0);
    let out = root.join("p2-new.img");
    restore(&moto, &new, p2.parse().unwrap(), &out);
    assert_same_bytes(&out, &img, file_len(&img));
    let v = ok(&receiver(&moto, &["verify", "--dir", s(&new), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
#[ignore = "needs moto_server"]
fn serve_refuses_object_lock_days_on_a_bucket_without_object_lock() {
    require_tools(&["moto_server"]);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = init(&moto, tmp.path(), "site-m");
    set_config(&dir, "store", "object_lock_days", toml::Value::Integer(7));
    let o = receiver(
        &moto,
        &["serve", "--listen", "127.0.0.1:0", "--dir", s(&dir)],
    );
    fails(
        &o,
        "the bucket dr-history has no Object Lock, but [store] object_lock_days = 7 needs S3 Object Lock",
    );
}

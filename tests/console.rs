//! The web console (`serve --console`): its pages in a real browser
//! (headless Chromium), its JSON API against `status --json`, and its
//! refusal of clients without an operator identity when it speaks TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{
    agent_config, bin, replicate_once, require_tools, run_bin, sample_image, wait_until, ChildGuard,
};
use tokio_util::sync::CancellationToken;

/// `serve --console 127.0.0.1:0` (and `extra` flags) on `dir`: the process,
/// the agents' address and the console's URL.
fn serve_with_console(dir: &Path, extra: &[&str]) -> (ChildGuard, SocketAddr, String) {
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--print-addr"])
        .args(["--console", "127.0.0.1:0"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let stdout = child.stdout.take().expect("stdout");
    let guard = ChildGuard(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let console = lines.next().unwrap().unwrap();
    let url = console
        .strip_prefix("console ")
        .unwrap_or_else(|| panic!("second line {console:?} is not the console's URL"))
        .to_owned();
    (guard, addr, url)
}

/// A plain HTTP/1.1 GET: the status code and the body.
fn http_get(url: &str, path: &str) -> (u16, String) {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = TcpStream::connect(&host).expect("connect to the console");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// What headless Chromium renders at `url`, as HTML.
fn browser_dom(url: &str) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium --dump-dom {url}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A screenshot of `url` as a test artifact.
fn screenshot(url: &str, name: &str) {
    let shot = artifacts().join(name);
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,700",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "screenshot: {out:?}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "{}",
        shot.display()
    );
    println!("screenshot: {}", shot.display());
}

/// Where tests leave files for a person to look at (screenshots).
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium (Debian package chromium)"]
async fn the_console_shows_the_stopped_server_first_and_flagged() {
    require_tools(&["chromium"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("receiver");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let (_receiver, addr, url) = serve_with_console(&dir, &[]);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // db1 made a point and stopped; web1 replicates on.
    let mut ids = Vec::new();
    for name in ["db1", "web1"] {
        let id = root.join(format!("{name}.pem"));
        pilotlight_receiver::admin::enroll(&dir, name, &id).unwrap();
        let img = root.join(format!("{name}.img"));
        sample_image(&img, 1 << 20, 5);
        ids.push((name, id, img));
    }
    let (_, id, img) = &ids[0];
    replicate_once(&agent_config(addr, id, &root.join("db1"), &[("root", img)])).await;
    let (_, id, img) = &ids[1];
    let mut cfg = agent_config(addr, id, &root.join("web1"), &[("root", img)]);
    cfg.once = false;
    cfg.interval = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let agent = tokio::spawn(pilotlight_agent::run(cfg, stop.clone()));
    wait_until(
        Duration::from_secs(60),
        "web1 replicating with a point",
        || {
            let st = pilotlight_receiver::status::status(&dir).unwrap();
            st.servers.iter().any(|s| {
                s.server == "web1" && s.state.as_str() == "replicating" && s.last_point.is_some()
            })
        },
    )
    .await;

    // The overview, rendered by a real browser.
    let dom = browser_dom(&url);
    let db1 = dom.find("data-server=\"db1\"").expect("db1 listed");
    let web1 = dom.find("data-server=\"web1\"").expect("web1 listed");
    assert!(db1 < web1, "the stopped server is listed first:\n{dom}");
    let row = &dom[dom[..db1].rfind("<tr").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("class=\"flagged\""), "db1 is flagged: {row}");
    assert!(
        row.contains("Disconnected") && row.contains("not replicating"),
        "{row}"
    );
    let row = &dom[dom[..web1].rfind("<tr").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(
        row.contains("class=\"ok\"") && row.contains("Healthy"),
        "web1: {row}"
    );
    screenshot(&url, "console-overview.png");
    screenshot(&format!("{url}servers/web1"), "console-web1.png");

    // One server: its chart, its points, and the commands of a point.
    let page = browser_dom(&format!("{url}servers/db1"));
    assert!(
        page.contains("aria-label=\"lag over the last 24 hours\""),
        "{page}"
    );
    assert!(page.contains("href=\"/servers/db1/points/1\""), "{page}");
    let point = browser_dom(&format!("{url}servers/db1/points/1"));
    let want = format!(
        "pilotlight-receiver restore --dir {} --server db1 --volume root --point 1 --to /dev/TARGET",
        dir.display()
    );
    assert!(point.contains(&want), "{point}");
    assert!(point.contains("pilotlight-receiver drill --dir"), "{point}");
    assert!(
        point.contains("pilotlight-agent restore --config /etc/pilotlight/agent.toml --server db1 --volume root --point 1 --to /dev/TARGET"),
        "{point}"
    );
    let (code, body) = http_get(&url, "/servers/nosuch");
    assert_eq!(code, 404);
    assert!(body.contains("there is no server named nosuch"), "{body}");
    assert_eq!(http_get(&url, "/api/servers/nosuch/points").0, 404);
    assert_eq!(http_get(&url, "/servers/db1/points/99").0, 404);

    // The API, field by field against `status --json` (lag moves on).
    let (code, body) = http_get(&url, "/api/servers");
    assert_eq!(code, 200);
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let out = run_bin(
        "pilotlight-receiver",
        &["status", "--json", "--dir", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (api, cli) = (api.as_array().unwrap(), cli.as_array().unwrap());
    assert_eq!(api.len(), 2);
    assert_eq!(api.len(), cli.len());
    for (a, c) in api.iter().zip(cli) {
        let (a, c) = (a.as_object().unwrap(), c.as_object().unwrap());
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            c.keys().collect::<Vec<_>>(),
            "same fields"
        );
        for (k, v) in a {
            if k == "lag_seconds" {
                let (x, y) = (v.as_f64().unwrap(), c[k].as_f64().unwrap());
                assert!((x - y).abs() < 30.0, "{k}: {x} vs {y}");
            } else if a["server"] == "web1"
                && (k == "last_point"
                    || k == "last_point_time"
                    || k == "points"
                    || k == "bytes_stored"
                    || k == "quota_used"
                    || k == "clock_skew_seconds")
            {
                // web1 makes points while we look.
            } else {
                assert_eq!(v, &c[k], "{} {k}", a["server"]);
            }
        }
    }
    let (code, body) = http_get(&url, "/api/servers/db1/points");
    assert_eq!(code, 200);
    let points: serde_json::Value = serde_json::from_str(&body).unwrap();
    let out = run_bin(
        "pilotlight-receiver",
        &[
            "points",
            "--json",
            "--server",
            "db1",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(
        points,
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    );
    stop.cancel();
    agent.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs curl (Debian package curl)"]
async fn over_tls_the_console_serves_operators_only() {
    require_tools(&["curl"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("receiver");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let agent = root.join("web1.pem");
    pilotlight_receiver::admin::enroll(&dir, "web1", &agent).unwrap();
    let op = root.join("alice.pem");
    let nbd = pilotlight_receiver::admin::enroll_operator(&dir, "alice", &op).unwrap();
    let (_receiver, _, url) = serve_with_console(&dir, &["--console-tls"]);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let api = format!("{url}api/servers");
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(nbd.join("ca-cert.pem"))
            .args(args)
            .arg(&api)
            .output()
            .unwrap()
    };
    // No client certificate: the handshake fails.
    let none = curl(&[]);
    assert!(!none.status.success(), "{none:?}");
    // A source server's identity: verified by the CA, refused as no operator.
    let server = curl(&["--cert", agent.to_str().unwrap()]);
    assert!(
        !server.status.success(),
        "an agent's identity got in: {server:?}"
    );
    // An operator: the API answers.
    let ok = curl(&[
        "--cert",
        nbd.join("client-cert.pem").to_str().unwrap(),
        "--key",
        nbd.join("client-key.pem").to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{ok:?}");
    let servers: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(servers[0]["server"], "web1");
    // Plain HTTP to a TLS console gets no page.
    let mut s =
        TcpStream::connect(url.trim_start_matches("https://").trim_end_matches('/')).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = write!(s, "GET /api/servers HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        !String::from_utf8_lossy(&reply).contains("web1"),
        "plain HTTP got data"
    );
}

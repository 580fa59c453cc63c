//! The console's pages and its JSON API. Every request reads the catalog
//! (on a blocking thread) the way `status` and `points` do, so the console
//! and the CLI never disagree.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::chart;
use crate::catalog::PointInfo;
use crate::status::{ServerState, ServerStatus};
use crate::ReceiveError;

type Dir = Arc<PathBuf>;

/// The console's routes over the receiver directory `dir`.
pub(super) fn router(dir: Dir) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/servers/{name}", get(server))
        .route("/servers/{name}/points/{id}", get(point))
        .route("/api/servers", get(api_servers))
        .route("/api/servers/{name}/points", get(api_points))
        .with_state(dir)
}

/// A failed read, as the operator sees it.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = page(
            "error",
            &format!("<p class=\"bad\">{}</p>", escape(&self.1)),
        );
        (self.0, Html(body)).into_response()
    }
}

impl From<ReceiveError> for Failure {
    fn from(e: ReceiveError) -> Self {
        let code = match e {
            ReceiveError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(code, e.to_string())
    }
}

/// Run a catalog read off the async workers.
async fn read<T: Send + 'static>(
    dir: &Dir,
    f: impl FnOnce(&Path) -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, Failure> {
    let dir = dir.clone();
    tokio::task::spawn_blocking(move || f(&dir))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(Failure::from)
}

async fn api_servers(State(dir): State<Dir>) -> Result<Response, Failure> {
    let status = read(&dir, crate::status::status).await?;
    Ok(Json(status).into_response())
}

async fn api_points(
    State(dir): State<Dir>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, Failure> {
    let points = read(&dir, move |d| points_of(d, &name)).await?;
    Ok(Json(points).into_response())
}

/// The points of `server`, oldest first; an unknown server is refused.
fn points_of(dir: &Path, server: &str) -> Result<Vec<PointInfo>, ReceiveError> {
    crate::admin::points(dir, Some(server))
}

/// How urgently a server needs a look: lower first.
fn severity(s: &ServerStatus) -> u8 {
    match s.state {
        ServerState::Revoked => 5,
        _ if s.rpo_breached => 0,
        ServerState::Disconnected | ServerState::ReceiverStopped => 1,
        ServerState::NeverReplicated => 2,
        ServerState::Replicating if !warnings(s).is_empty() => 3,
        ServerState::Replicating => 4,
    }
}

/// The replication state as AWS DRS names it.
fn replication(s: &ServerStatus) -> &'static str {
    match s.state {
        ServerState::Revoked => "Revoked",
        ServerState::ReceiverStopped => "Receiver stopped",
        ServerState::NeverReplicated => "Not started",
        ServerState::Disconnected => "Disconnected",
        ServerState::Replicating if s.rpo_breached => "Lagging",
        ServerState::Replicating => "Healthy",
    }
}

/// What an operator should look at, one sentence each.
fn warnings(s: &ServerStatus) -> Vec<String> {
    let mut w = Vec::new();
    if s.rpo_breached {
        w.push(format!(
            "RPO breached: lag {} over the target {}",
            s.lag_seconds.map_or("-".into(), chart::seconds),
            chart::seconds(s.rpo_target_seconds)
        ));
    }
    if matches!(
        s.state,
        ServerState::Disconnected | ServerState::NeverReplicated | ServerState::ReceiverStopped
    ) {
        w.push(format!("not replicating ({})", s.state));
    }
    for f in &s.staging_failures {
        let what = f.volume.as_deref().unwrap_or("the server");
        w.push(format!(
            "staging of {what} failing since {}: {}",
            f.since, f.error
        ));
    }
    if let Some(skew) = s.clock_skew_seconds.filter(|k| k.abs() > 300.0) {
        w.push(format!("agent clock off by {}", chart::seconds(skew.abs())));
    }
    if let Some(q) = s.quota.filter(|&q| q > 0 && s.quota_used * 10 >= q * 9) {
        w.push(format!("quota {}% used", s.quota_used * 100 / q));
    }
    w
}

async fn overview(State(dir): State<Dir>) -> Result<Html<String>, Failure> {
    let mut servers = read(&dir, crate::status::status).await?.servers;
    servers.sort_by(|a, b| {
        severity(a)
            .cmp(&severity(b))
            .then(
                b.lag_seconds
                    .unwrap_or(f64::MAX)
                    .total_cmp(&a.lag_seconds.unwrap_or(f64::MAX)),
            )
            .then(a.server.cmp(&b.server))
    });
    let mut body = String::from(
        "<table id=\"servers\"><thead><tr><th>Server</th><th>Replication</th><th>Lag / RPO</th>\
         <th>Last durable point</th><th>Stored</th><th>Quota</th><th>Warnings</th></tr></thead><tbody>",
    );
    for s in &servers {
        let w = warnings(s);
        let class = if w.is_empty() { "ok" } else { "flagged" };
        let _ = write!(
            body,
            "<tr class=\"{class}\" data-server=\"{name}\" data-state=\"{state}\"><td><a href=\"/servers/{name}\">{name}</a></td>\
             <td>{repl} <small>{state}</small></td><td>{lag} / {rpo}</td><td>{last}</td><td>{stored}</td><td>{quota}</td><td>{warn}</td></tr>",
            name = escape(&s.server),
            state = s.state,
            repl = replication(s),
            lag = s.lag_seconds.map_or("-".into(), chart::seconds),
            rpo = chart::seconds(s.rpo_target_seconds),
            last = match (s.last_point, &s.last_point_time) {
                (Some(id), Some(t)) => format!("{id} at {}", escape(t)),
                _ => "none".into(),
            },
            stored = bytes(s.bytes_stored),
            quota = s.quota.map_or("unlimited".into(), |q| format!("{} of {}", bytes(s.quota_used), bytes(q))),
            warn = w.iter().map(|x| format!("<span class=\"warn\">{}</span>", escape(x))).collect::<Vec<_>>().join(" "),
        );
    }
    body.push_str("</tbody></table>");
    if servers.is_empty() {
        body.push_str("<p>No server is enrolled yet: <code>pilotlight-receiver enroll --dir DIR --server NAME --out FILE</code>.</p>");
    }
    Ok(Html(page("servers", &body)))
}

async fn server(
    State(dir): State<Dir>,
    UrlPath(name): UrlPath<String>,
) -> Result<Html<String>, Failure> {
    let n = name.clone();
    let (status, points) = read(&dir, move |d| {
        let status = crate::status::status(d)?;
        Ok((status, points_of(d, &n)?))
    })
    .await?;
    let s = status
        .servers
        .iter()
        .find(|s| s.server == name)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no server named {name}")))?;
    let now = pilotlight_protocol::clock::now_ms();
    let created: Vec<i64> = points.iter().map(|p| p.created_ms).collect();
    let fuzzy = points.iter().filter(|p| p.consistency == "fuzzy").count();
    let mut body = format!(
        "<h2>{name}</h2><p>{repl} ({state}); lag {lag}, RPO target {rpo}; {n} points ({cc} crash-consistent after a freeze, {fuzzy} fuzzy); {stored} stored.</p>",
        name = escape(&s.server),
        repl = replication(s),
        state = s.state,
        lag = s.lag_seconds.map_or("-".into(), chart::seconds),
        rpo = chart::seconds(s.rpo_target_seconds),
        n = points.len(),
        cc = points.len() - fuzzy,
        stored = bytes(s.bytes_stored),
    );
    for w in warnings(s) {
        let _ = write!(body, "<p class=\"warn\">{}</p>", escape(&w));
    }
    let _ = write!(
        body,
        "<h3>Lag, last 24 hours</h3>{}<h3>Points</h3>{}",
        chart::lag(&created, now, s.rpo_target_seconds),
        chart::timeline(
            &points
                .iter()
                .map(|p| (p.created_ms, p.consistency != "fuzzy"))
                .collect::<Vec<_>>(),
            now
        ),
    );
    body.push_str("<table><thead><tr><th>Point</th><th>Created (receiver)</th><th>Consistency</th><th>Commit</th><th>Volumes (changed)</th></tr></thead><tbody>");
    for p in points.iter().rev() {
        let vols: Vec<String> = p
            .volumes
            .iter()
            .map(|v| {
                format!(
                    "{} {} ({})",
                    escape(&v.name),
                    bytes(v.size),
                    bytes(v.changed_bytes)
                )
            })
            .collect();
        let _ = write!(
            body,
            "<tr><td><a href=\"/servers/{name}/points/{id}\">{id}</a></td><td>{created}</td><td>{cons}</td><td>{commit}</td><td>{vols}</td></tr>",
            name = escape(&s.server),
            id = p.id,
            created = escape(&p.created),
            cons = escape(&p.consistency),
            commit = escape(&p.commit),
            vols = vols.join(", "),
        );
    }
    body.push_str("</tbody></table>");
    Ok(Html(page(&s.server, &body)))
}

async fn point(
    State(dir): State<Dir>,
    UrlPath((name, id)): UrlPath<(String, i64)>,
) -> Result<Html<String>, Failure> {
    let n = name.clone();
    let points = read(&dir, move |d| points_of(d, &n)).await?;
    let p = points
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("{name} has no point {id}")))?;
    let d = shell_word(&dir.display().to_string());
    let s = shell_word(&name);
    let mut cmds = format!(
        "# a drill: every volume writable, changes discarded when stopped\n\
         pilotlight-receiver drill --dir {d} --server {s} --point {id}\n"
    );
    for v in &p.volumes {
        let v = shell_word(&v.name);
        let _ = write!(
            cmds,
            "\n# volume {v}: serve it over NBD now (read-only)\n\
             pilotlight-receiver export --dir {d} --server {s} --volume {v} --point {id} --socket /run/pilotlight/{s}-{v}.sock\n\
             # or restore it in full to a device or file\n\
             pilotlight-receiver restore --dir {d} --server {s} --volume {v} --point {id} --to /dev/TARGET\n\
             # or fail back by delta, on the server to fail back to (its agent stopped; another\n\
             # server's volume needs `pilotlight-receiver grant --restore-from {s}` first)\n\
             pilotlight-agent restore --config /etc/pilotlight/agent.toml --server {s} --volume {v} --point {id} --to /dev/TARGET\n"
        );
    }
    let body = format!(
        "<h2><a href=\"/servers/{n}\">{n}</a>, point {id}</h2><p>Created {created} (agent's clock: {source}), {cons}, {commit} commit.</p>\
         <h3>Commands</h3><pre id=\"commands\">{cmds}</pre>",
        n = escape(&name),
        created = escape(&p.created),
        source = escape(&p.source_time),
        cons = escape(&p.consistency),
        commit = escape(&p.commit),
        cmds = escape(&cmds),
    );
    Ok(Html(page(&format!("{name} point {id}"), &body)))
}

/// A whole page around `body`.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pilotlight: {t}</title><style>{STYLE}</style></head>\
         <body><header><a href=\"/\">pilotlight</a> <span>recovery console (read-only)</span></header><main>{body}</main></body></html>",
        t = escape(title),
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#222}header{background:#23395d;color:#fff;padding:.6em 1em}\
header a{color:#fff;font-weight:bold;text-decoration:none}main{padding:1em}table{border-collapse:collapse}\
td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}tr.flagged{background:#fdecea}\
.warn{color:#a1260d;display:block}.bad{color:#a1260d}small{color:#666}pre{background:#f4f4f4;padding:.8em}\
svg .bg{fill:#fafafa}svg .lag{fill:none;stroke:#23395d;stroke-width:1.5}svg .target{stroke:#a1260d;stroke-dasharray:4 3}\
svg text{font-size:10px;fill:#555}svg .axis{stroke:#999}svg .cc{fill:#23395d}svg .fuzzy{fill:#fff;stroke:#23395d}";

/// `text` safe inside HTML text and attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `word` as one shell word (quoted when it needs to be).
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Bytes in binary units.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_in_html_and_quoted_in_commands() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(shell_word("/var/lib/pilotlight"), "/var/lib/pilotlight");
        assert_eq!(shell_word("my dir"), "'my dir'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}

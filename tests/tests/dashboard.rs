//! The dashboard in a real browser: Debian's Chromium, headless, driven
//! through its chromedriver (installed by `.ci/run`; never skipped), against
//! a real controller with a load fleet on its embedded broker. An operator
//! logs in, sees the fleet, opens a device, watches a rollout started through
//! the API advance on its page and pauses it there; the audit page shows the
//! pause; a viewer sees no action and a forged action is refused. Each page is
//! photographed at desktop and phone width (into `$EDGEFLEET_SCREENSHOTS`
//! when set, as `docs/dashboard/` is made; into a temporary directory
//! otherwise).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgefleet_tests::{BundleSpec, Harness, WAIT, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// chromedriver on a free loopback port (killed on drop).
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromedriver is installed (Debian's chromium-driver; .ci/run installs it)");
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let driver = Driver { child, url };
    wait_for("chromedriver to answer", || {
        ureq::get(&format!("{}/status", driver.url)).call().ok()
    });
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--hide-scrollbars"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a headless Chromium session")
}

/// Where the screenshots go.
fn shots_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("EDGEFLEET_SCREENSHOTS") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).expect("screenshot dir");
            (d, None)
        }
        None => {
            let t = tempfile::tempdir().expect("temp dir");
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Photographs the current page at desktop and phone width.
async fn photograph(b: &Client, dir: &Path, name: &str) {
    for (suffix, w, h) in [("desktop", 1280, 900), ("phone", 390, 844)] {
        b.set_window_size(w, h).await.expect("resize");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = b.screenshot().await.expect("screenshot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{name} {suffix}: a real picture ({} bytes)",
            png.len()
        );
        std::fs::write(dir.join(format!("{name}-{suffix}.png")), png).expect("write png");
    }
    b.set_window_size(1280, 900).await.expect("resize");
}

/// Waits until the page's text contains `text` (the page may refresh itself).
async fn wait_text(b: &Client, text: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Between a form's post and the page it leads to there is no body yet.
        let body = match b.find(Locator::Css("body")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if body.contains(text) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed {text:?}; it shows:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks the element: found again when a live page swapped it out meanwhile.
async fn click(b: &Client, css: &str) {
    for _ in 0..10 {
        if let Ok(e) = b.find(Locator::Css(css)).await
            && e.click().await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not click {css}");
}

async fn log_in(b: &Client, url: &str, token: &str) {
    b.goto(&format!("{url}/")).await.expect("open");
    assert!(
        b.current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/login")
    );
    b.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type");
    b.find(Locator::Css("form button[type=submit]"))
        .await
        .expect("log in button")
        .click()
        .await
        .expect("log in");
    wait_text(b, "rollouts running").await;
    let u = b.current_url().await.expect("url");
    assert!(!u.as_str().contains(token), "no token in the URL: {u}");
}

fn token(h: &Harness, name: &str, role: &str) -> String {
    let v = h
        .api
        .post("/api/v1/tokens", &json!({"name": name, "role": role}))
        .expect("token");
    v["token"].as_str().expect("token").to_owned()
}

/// Posts a form from inside the page (as a forged page script would), and
/// returns the HTTP status.
async fn post_from_page(b: &Client, path: &str, csrf: Option<&str>) -> u64 {
    let script = r#"
        const [path, csrf, done] = arguments;
        const body = new URLSearchParams();
        if (csrf !== null) body.set("csrf", csrf);
        fetch(path, {method: "POST", body, credentials: "same-origin", redirect: "manual"})
            .then(r => done(r.status)).catch(e => done(-1));
    "#;
    let v = b
        .execute_async(script, vec![json!(path), json!(csrf)])
        .await
        .expect("script");
    v.as_u64().unwrap_or(0)
}

#[test]
fn an_operator_watches_and_pauses_a_rollout_and_a_viewer_cannot_act() {
    let h = Harness::start(|c| c.rollouts.tick_ms = 200);
    let (fleet, ids) = h.load_fleet(12, Duration::from_secs(1));
    wait_for("12 devices online", || (h.online() == 12).then_some(()));
    let operator = token(&h, "olivia", "operator");
    let viewer = token(&h, "victor", "viewer");
    let digest = h.upload(&h.build(&BundleSpec::new("iris_logreg.onnx", (1, 1, 0), 2)));
    let driver = start_driver();
    let (dir, _keep) = shots_dir();
    let url = h.url.clone();

    h.runtime.block_on(async {
        let b = browser(&driver).await;
        log_in(&b, &url, &operator).await;
        let fleet_text = wait_text(&b, "12 online").await;
        assert!(fleet_text.contains("olivia · operator"), "{fleet_text}");
        photograph(&b, &dir, "fleet").await;

        b.goto(&format!("{url}/devices?q=load-0000"))
            .await
            .expect("devices");
        let list = wait_text(&b, "10 devices match").await;
        assert!(list.contains("load-00003"), "{list}");
        photograph(&b, &dir, "devices").await;
        b.find(Locator::LinkText("load-00003"))
            .await
            .expect("link")
            .click()
            .await
            .expect("open device");
        wait_text(&b, "Telemetry, last hour").await;
        wait_text(&b, "CPU").await;
        photograph(&b, &dir, "device").await;

        // A rollout started through the API advances on its page, which
        // refreshes itself: the test never reloads it.
        let id = h.rollout(&json!({
            "bundle": digest, "selector": {"all": true},
            "waves": ["1", "50%", "100%"], "gates": {"soak_ms": 15_000},
        }));
        b.goto(&format!("{url}/rollouts/{id}"))
            .await
            .expect("rollout page");
        wait_text(&b, "Wave 1 · 1 device\n").await;
        wait_text(&b, "wave 2 of 3").await;
        wait_text(&b, "Decision log").await;
        photograph(&b, &dir, "rollout").await;
        click(&b, "form[action$='/pause'] button").await;
        let paused = wait_text(&b, "pause done: now paused").await;
        assert!(paused.contains("Resume"), "{paused}");
        assert_eq!(h.rollout_view(&id)["phase"], "paused");

        b.goto(&format!("{url}/audit")).await.expect("audit");
        let audit = wait_text(&b, "rollout.pause").await;
        assert!(audit.contains("olivia"), "{audit}");
        photograph(&b, &dir, "audit").await;
        b.goto(&format!("{url}/bundles/{digest}"))
            .await
            .expect("bundle");
        wait_text(&b, "runs on").await;
        photograph(&b, &dir, "bundle").await;

        // The viewer: the same pages, no action, and a forged one refused.
        b.find(Locator::Css("form[action='/logout'] button"))
            .await
            .expect("log out")
            .click()
            .await
            .expect("log out");
        wait_text(&b, "API token").await;
        log_in(&b, &url, &viewer).await;
        b.goto(&format!("{url}/rollouts/{id}"))
            .await
            .expect("rollout page");
        let seen = wait_text(&b, "victor · viewer").await;
        assert!(
            !seen.contains("Resume") && !seen.contains("Abort"),
            "{seen}"
        );
        assert!(
            b.find_all(Locator::Css("form.action"))
                .await
                .expect("forms")
                .is_empty()
        );
        let csrf = b
            .find(Locator::Css("form[action='/logout'] input[name=csrf]"))
            .await
            .expect("form token")
            .attr("value")
            .await
            .expect("value")
            .expect("a value");
        let resume = format!("/rollouts/{id}/resume");
        assert_eq!(
            post_from_page(&b, &resume, Some(&csrf)).await,
            403,
            "viewer's role"
        );
        assert_eq!(
            post_from_page(&b, &resume, None).await,
            403,
            "no form token"
        );
        b.close().await.expect("close browser");
    });
    assert_eq!(h.rollout_view(&id_of_only_rollout(&h))["phase"], "paused");
    let audit = h.api.get("/api/v1/audit").expect("audit");
    let resumes = audit["audit"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|a| a["action"] == "rollout.resume")
        .count();
    assert_eq!(resumes, 0, "nothing resumed: {audit}");
    for page in ["fleet", "devices", "device", "rollout", "audit", "bundle"] {
        for w in ["desktop", "phone"] {
            assert!(dir.join(format!("{page}-{w}.png")).exists(), "{page}-{w}");
        }
    }
    drop(fleet);
    drop(ids);
}

fn id_of_only_rollout(h: &Harness) -> String {
    let all = h.api.get("/api/v1/rollouts").expect("rollouts");
    all["rollouts"][0]["id"].as_str().expect("id").to_owned()
}

#[test]
fn sessions_are_http_only_same_site_cookies_and_the_login_refuses_unknown_tokens() {
    let h = Harness::start(|_| {});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let login = format!("{}/login", h.url);
    let r = agent
        .post(&login)
        .send_form([("token", "not-a-token")])
        .expect("post");
    assert_eq!(r.status(), 401);
    let operator = token(&h, "olivia", "operator");
    let r = agent
        .post(&login)
        .send_form([("token", operator.as_str())])
        .expect("post");
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/")
    );
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("cookie")
        .to_owned();
    for part in [
        "edgefleet_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(cookie.contains(part), "{part} in {cookie}");
    }
    assert!(!cookie.contains(&operator), "the cookie is not the token");
    let session = cookie.split(';').next().expect("pair").to_owned();
    let page = |path: &str| {
        let mut r = agent
            .get(&format!("{}{path}", h.url))
            .header("cookie", &session)
            .call()
            .expect("get");
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        )
    };
    let (status, body) = page("/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("olivia"), "{body}");
    // Without the cookie: to the login page; a form from elsewhere: refused.
    let r = agent
        .get(&format!("{}/devices", h.url))
        .call()
        .expect("get");
    assert_eq!(r.status(), 303);
    let r = agent
        .post(&format!("{}/devices/x/revert", h.url))
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .send_form([("csrf", "whatever")])
        .expect("post");
    assert_eq!(r.status(), 403);
    // The API still answers JSON errors on its own routes.
    let (status, body) = page("/api/v1/nothing-here");
    assert_eq!(status, 404);
    assert!(body.contains("\"not_found\""), "{body}");
    let (status, body) = page("/devices/no-such-device");
    assert_eq!(status, 404);
    assert!(body.contains("no device no-such-device"), "{body}");
}

//! The API Keys console in a real headless Chromium, against the real gateway and a real
//! upstream. Screenshots go to `target/console/` for people to look at.

mod support;

use std::path::PathBuf;

use support::browser::Browser;
use support::*;

const ESCAPE: &str = "\u{E00C}";

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console")
}

async fn setup() -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let routes = route("/", up.addr, "production", "");
    let extra = "tiers:\n  pro: {max_keys: 10}\n  one: {max_keys: 1}\nnamespaces:\n  acme: {tier: pro}\n  globex: {}\n  solo: {tier: one}\n";
    let gw = TestGateway::start(&config_yaml(&routes, extra)).await;
    (up, gw)
}

/// The rows of the keys table, as their key ids.
async fn rows(b: &Browser) -> Vec<String> {
    let v = b
        .eval("return [...document.querySelectorAll('#keys-body tr')].map(r => r.dataset.keyId)")
        .await;
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(String::from))
        .collect()
}

async fn wait_rows(b: &Browser, n: usize) {
    b.wait_until(
        &format!("the table shows {n} row(s)"),
        &format!(
            "return document.querySelectorAll('#keys-body tr').length === {n} && \
             (document.querySelector('#keys-table').parentElement.hidden === ({n} === 0))"
        ),
    )
    .await;
}

async fn sign_in(b: &Browser, token: &str) {
    b.type_into("#token", token).await;
    b.click("#signin-form button[type=submit]").await;
}

/// How many dark pixels the page drew in the middle of the shown secret's first character,
/// then of each `_`, read from a screenshot of the field: a clipped underscore draws none,
/// and `kg_live_…` then reads as `kg live …`.
async fn underscore_ink(b: &Browser) -> Vec<u64> {
    b.eval("const i = document.querySelector('#secret-value'); i.setSelectionRange(0, 0); i.blur(); i.scrollLeft = 0;")
        .await;
    let png = b.element_screenshot("#secret-value").await;
    let v = b
        .eval_async(
            r#"const [png, done] = arguments;
            const input = document.querySelector('#secret-value');
            const style = getComputedStyle(input);
            const measure = document.createElement('canvas').getContext('2d');
            measure.font = `${style.fontSize} ${style.fontFamily}`;
            const cell = measure.measureText('M').width;
            const left = parseFloat(style.paddingLeft) + parseFloat(style.borderLeftWidth);
            // Decoded from bytes: the console's policy allows no data: images, rightly.
            const bytes = Uint8Array.from(atob(png), (ch) => ch.charCodeAt(0));
            createImageBitmap(new Blob([bytes], { type: 'image/png' })).then((img) => {
              const canvas = document.createElement('canvas');
              canvas.width = img.width; canvas.height = img.height;
              const ctx = canvas.getContext('2d');
              ctx.drawImage(img, 0, 0);
              const scale = img.width / input.getBoundingClientRect().width;
              const dark = (i) => {
                const x0 = Math.round((left + (i + 0.25) * cell) * scale);
                const x1 = Math.round((left + (i + 0.75) * cell) * scale);
                const d = ctx.getImageData(x0, 0, Math.max(1, x1 - x0), img.height).data;
                let n = 0;
                for (let p = 0; p < d.length; p += 4) if (d[p] + d[p + 1] + d[p + 2] < 400) n++;
                return n;
              };
              // The first character (`k`) first, which proves the columns are read right.
              const ink = [dark(0)];
              [...input.value].forEach((c, i) => { if (c === '_') ink.push(dark(i)); });
              done(ink);
            }, (e) => done(String(e)));"#,
            vec![serde_json::Value::from(png)],
        )
        .await;
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect()
}

/// Reads the secret shown once, copies it, acknowledges, and closes the dialog.
async fn take_secret(b: &Browser) -> String {
    b.find("#secret[open]").await;
    let secret = b.property("#secret-value", "value").await;
    let secret = secret.as_str().unwrap().to_string();
    assert!(secret.starts_with("kg_"), "{secret}");
    // Every underscore of the secret is drawn, so that it can be copied by eye.
    let ink = underscore_ink(b).await;
    let (first, underscores) = ink.split_first().expect("the first character's ink");
    assert!(
        *first >= 4,
        "the columns are found: `k` drew {first} dark pixels"
    );
    assert_eq!(underscores.len(), secret.matches('_').count(), "{ink:?}");
    assert!(
        underscores.iter().all(|&n| n >= 2),
        "every underscore is drawn: {underscores:?}"
    );
    assert_eq!(
        b.property("#secret-done", "disabled").await,
        true,
        "Done waits for the acknowledgement"
    );
    b.press(ESCAPE).await;
    assert!(
        !b.all("#secret[open]").await.is_empty(),
        "Escape does not leave the dialog before the acknowledgement"
    );
    b.click("#copy").await;
    b.wait_until(
        "the copy is confirmed",
        "return document.querySelector('#copied').textContent.length > 0",
    )
    .await;
    b.click("#ack").await;
    b.click("#secret-done").await;
    b.wait_until(
        "the secret dialog closes",
        "return !document.querySelector('#secret').open",
    )
    .await;
    assert!(
        !on_page(b, &secret).await,
        "the secret is gone from the DOM once acknowledged"
    );
    secret
}

/// Whether `text` is anywhere in the page: its markup or any field's value.
/// Every control on the page has a label, and the browser logged nothing but refused
/// requests (a script error or a policy violation fails).
async fn labelled_and_clean(b: &Browser) {
    let unlabelled = b
        .eval(
            "return [...document.querySelectorAll('input, select, textarea, button')]
               .filter(e => !(e.labels?.length || e.getAttribute('aria-label') || e.textContent.trim()))
               .map(e => e.id || e.outerHTML)",
        )
        .await;
    assert_eq!(
        unlabelled,
        serde_json::json!([]),
        "controls without a label"
    );
    let errors: Vec<_> = b
        .errors()
        .await
        .into_iter()
        .filter(|e| !e.contains("Failed to load resource"))
        .collect();
    assert!(errors.is_empty(), "browser errors: {errors:?}");
}

async fn on_page(b: &Browser, text: &str) -> bool {
    let script = format!(
        "const s = {}; return document.documentElement.outerHTML.includes(s) || \
         [...document.querySelectorAll('input, textarea')].some(e => e.value.includes(s))",
        serde_json::Value::from(text)
    );
    b.eval(&script).await == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_run_the_key_lifecycle_from_the_console() {
    let (_up, gw) = setup().await;
    let b = Browser::start(1280, 900).await;
    let console = format!("http://{}/console", gw.admin);
    b.goto(&console).await;

    // A wrong token is refused, and nothing is kept.
    sign_in(&b, "kg_admin_wrong").await;
    b.wait_until(
        "the refusal is shown",
        "return !document.querySelector('#signin-error').hidden",
    )
    .await;
    let refused = b.text("#signin-error").await;
    assert!(
        refused.contains("refused") && !refused.contains("Sign in again"),
        "a first attempt is not told to sign in again: {refused}"
    );
    assert_eq!(b.eval("return sessionStorage.length").await, 0);
    assert!(b.all("#app:not([hidden])").await.is_empty());

    sign_in(&b, ADMIN_TOKEN).await;
    b.find("#view-keys").await;
    assert_eq!(
        b.eval("return document.cookie + location.href.includes('kg_admin')")
            .await,
        "false",
        "no cookie, and the token is not in the URL"
    );
    assert_eq!(b.text("#ns-usage").await, "0 of 10 keys, Pro");
    b.find("#empty-create").await;
    assert!(b.text("#empty").await.contains("No active API keys"));

    // Create, with every field checked in place.
    b.click("#empty-create").await;
    b.find("#key-form[open]").await;
    // The form offers the environments the routes serve, and nothing else.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#f-environment option')].map(o => o.value).join(' ')")
            .await,
        "production"
    );
    b.click("#key-form-submit").await;
    assert!(b.text("#e-name").await.contains("name"));
    assert_eq!(
        b.eval("return document.querySelector('#f-name').getAttribute('aria-invalid')")
            .await,
        "true"
    );
    b.type_into("#f-name", "ci-deploy").await;
    b.click("#add-scope").await;
    b.type_into("#scopes .scope input", "/v1/**").await;
    assert!(
        b.all("#e-name:not([hidden])").await.is_empty(),
        "the error goes once the field is changed"
    );
    // An address is checked as it is typed, before any submit.
    b.type_into("#f-cidrs", "10.0.0.300/8").await;
    assert!(
        b.text("#e-allowed_cidrs").await.contains("0 to 255"),
        "{}",
        b.text("#e-allowed_cidrs").await
    );
    b.type_into("#f-cidrs", "127.0.0.0/8\n0.0.0.0/0").await;
    assert!(b.all("#e-allowed_cidrs:not([hidden])").await.is_empty());
    assert!(b.text("#w-cidrs").await.contains("every IPv4 address"));
    b.type_into("#f-note", "deploys from CI").await;
    b.screenshot(&artifacts().join("create-dialog.png")).await;
    b.type_into("#f-cidrs", "127.0.0.0/8").await;
    assert!(b.all("#w-cidrs:not([hidden])").await.is_empty());
    // The server's refusal is shown beside the field it names.
    b.type_into("#f-rate", "5/fortnight").await;
    b.click("#key-form-submit").await;
    b.find("#e-rate_limit:not([hidden])").await;
    let problem = b.text("#e-rate_limit").await;
    assert!(!problem.is_empty() && b.all("#secret[open]").await.is_empty());
    // Written for a person: no backticks, a capital and a full stop.
    assert!(
        !problem.contains('`')
            && problem.ends_with('.')
            && problem.starts_with(|c: char| c.is_uppercase() || c == '“'),
        "{problem}"
    );
    assert_eq!(
        b.eval("return document.activeElement.id").await,
        "f-rate",
        "the refused field has the focus"
    );
    b.type_into("#f-rate", "100/s").await;
    b.click("#key-form-submit").await;
    let secret = take_secret(&b).await;

    // The key works through the proxy: three accepted calls and one out of scope.
    for _ in 0..3 {
        let r = send(Req::get(gw.proxy, "/v1/things").bearer(&secret)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = send(Req::get(gw.proxy, "/admin/things").bearer(&secret)).await;
    assert_eq!(r.code(), "scope_denied");
    gw.gateway().housekeeping();

    // Reloading the page keeps the session, shows the usage, and never the secret.
    b.refresh().await;
    wait_rows(&b, 1).await;
    assert!(!on_page(&b, &secret).await);
    let row = b.text("#keys-body tr").await;
    assert!(
        row.contains("ci-deploy") && row.contains("production"),
        "{row}"
    );
    assert!(
        row.contains("read:/v1/**") && row.contains("Active"),
        "{row}"
    );
    // The list shows the rate limit, the expiry and the note.
    assert_eq!(
        b.text("#keys-body td[data-label='Rate limit']").await,
        "100/s"
    );
    assert_eq!(b.text("#keys-body td[data-label='Expires']").await, "never");
    assert_eq!(
        b.text("#keys-body td[data-label='Note']").await,
        "deploys from CI"
    );
    assert!(row.contains("just now"), "last used: {row}");
    assert_eq!(
        b.text("#keys-body td[data-label='Requests today']").await,
        "4"
    );
    assert_eq!(
        b.text("#keys-body td[data-label='Error rate']").await,
        "25.0%"
    );
    assert_eq!(b.text("#ns-usage").await, "1 of 10 keys, Pro");

    // A second key, to filter and search among.
    let (other, _) = gw
        .create_key(keygate::keys::NewKey {
            name: "analytics-export".into(),
            ..new_key("acme", "production")
        })
        .await;
    b.refresh().await;
    wait_rows(&b, 2).await;
    b.screenshot(&artifacts().join("keys-table.png")).await;
    // A key with no requests has no error rate to show.
    assert_eq!(
        b.text(&format!(
            "#keys-body tr[data-key-id='{}'] td[data-label='Error rate']",
            other.id
        ))
        .await,
        "—"
    );
    // A search that matches nothing offers to clear itself, not to create a key.
    b.type_into("#search", "no-such-key").await;
    wait_rows(&b, 0).await;
    assert!(b.text("#empty").await.contains("no-such-key"));
    assert!(b.all("#empty-create:not([hidden])").await.is_empty());
    b.click("#empty-clear").await;
    wait_rows(&b, 2).await;
    assert!(!b.url().await.contains("q="));
    b.type_into("#search", "ci-").await;
    wait_rows(&b, 1).await;
    assert!(b.url().await.contains("q=ci-"), "the search is in the URL");
    // A shared view: the same URL in a fresh load shows the same rows.
    let shared = b.url().await;
    b.goto(&shared).await;
    wait_rows(&b, 1).await;
    assert_eq!(b.property("#search", "value").await, "ci-");
    let ci_id = rows(&b).await.remove(0);
    assert_ne!(ci_id, other.id);

    // Key detail: the chart has the requests just made, the refusal code and the audit.
    b.click(&format!(
        "#keys-body tr[data-key-id='{ci_id}'] td[data-label='Name'] a"
    ))
    .await;
    b.find("#view-key").await;
    b.wait_until(
        "the chart is drawn",
        "return document.querySelector('#chart svg') !== null",
    )
    .await;
    assert_eq!(
        b.eval("return document.querySelector('#chart svg').dataset.accepted")
            .await,
        "3"
    );
    assert_eq!(
        b.eval("return document.querySelector('#chart svg').dataset.refused")
            .await,
        "1"
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('#chart rect').length > 0")
            .await,
        true
    );
    assert!(b.text("#refusals").await.contains("scope_denied"));
    assert!(b.text("#key-facts").await.contains("127.0.0.1"), "last IP");
    assert!(b.text("#key-audit").await.contains("key.created"));
    b.screenshot(&artifacts().join("key-detail.png")).await;

    // Org-wide usage: today's totals, the chart, the namespace, the codes and the top keys.
    b.click("#nav-usage").await;
    b.find("#view-usage").await;
    b.wait_until(
        "the usage is drawn",
        "return document.querySelector('#usage-chart svg') !== null",
    )
    .await;
    let tiles = b.text("#usage-tiles").await;
    assert!(
        tiles.contains("4\nrequests") || tiles.contains("4 requests"),
        "{tiles}"
    );
    assert_eq!(
        b.eval("return document.querySelector('#usage-chart svg').dataset.accepted")
            .await,
        "3"
    );
    assert!(b.text("#usage-namespaces").await.contains("acme"));
    assert!(b.text("#usage-codes").await.contains("scope_denied"));
    assert!(b.text("#usage-top").await.contains(&ci_id));
    b.click(&format!("#usage-top a[href*='{ci_id}']")).await;
    b.find("#view-key").await;

    // Regenerate: same key id, new secret once, the old one stops at once.
    b.click("#key-actions button[data-action=regenerate]").await;
    assert!(b
        .text("#confirm-text")
        .await
        .contains("stops working immediately"));
    b.click("#confirm-ok").await;
    let regenerated = take_secret(&b).await;
    assert_ne!(regenerated, secret);
    let r = send(Req::get(gw.proxy, "/v1/things").bearer(&secret)).await;
    assert_eq!(r.status, 401);
    let r = send(Req::get(gw.proxy, "/v1/things").bearer(&regenerated)).await;
    assert_eq!(r.status, 200);

    // The regenerate message says what happened once.
    let said = b.text("#flash").await;
    assert_eq!(said.matches("old secret").count(), 1, "{said}");

    // Revoke from the row's menu: the confirmation names the key by name and id and the
    // consequence; then 401 revoked_key.
    b.click("#back").await;
    wait_rows(&b, 1).await;
    assert!(
        b.all("#flash:not([hidden])").await.is_empty(),
        "a message does not outlive its page"
    );
    b.click(&format!(
        "#keys-body tr[data-key-id='{ci_id}'] details.menu summary"
    ))
    .await;
    b.click(&format!(
        "#keys-body tr[data-key-id='{ci_id}'] details.menu button.danger-text"
    ))
    .await;
    let warning = b.text("#confirm-text").await;
    assert!(
        warning.contains("permanent")
            && warning.contains("401 on their next call")
            && warning.contains("ci-deploy")
            && warning.contains(&ci_id),
        "{warning}"
    );
    b.click("#confirm-ok").await;
    wait_rows(&b, 0).await;
    let r = send(Req::get(gw.proxy, "/v1/things").bearer(&regenerated)).await;
    assert_eq!(r.code(), "revoked_key");
    // Filter by status: the revoked key is under Revoked.
    b.type_into("#search", "").await;
    b.eval("const s = document.querySelector('#status'); s.value = 'revoked'; s.dispatchEvent(new Event('change')); return true")
        .await;
    wait_rows(&b, 1).await;
    assert!(b.url().await.contains("status=revoked"));
    assert!(b.text("#keys-body tr").await.contains("Revoked"));
    // A revoked key says when and by whom, not when it would have expired.
    b.click(&format!(
        "#keys-body tr[data-key-id='{ci_id}'] td[data-label='Name'] a"
    ))
    .await;
    b.find("#view-key").await;
    b.wait_until(
        "the facts are shown",
        "return document.querySelector('#key-facts').textContent.includes('Revoked')",
    )
    .await;
    let facts = b.text("#key-facts").await;
    assert!(
        facts.contains("by tests") && !facts.contains("Expires"),
        "{facts}"
    );
    b.click("#back").await;

    // Audit log, filtered by action.
    b.click("#nav-audit").await;
    b.find("#view-audit").await;
    b.eval("const s = document.querySelector('#audit-action'); s.value = 'key.revoked'; s.dispatchEvent(new Event('change')); return true")
        .await;
    b.wait_until(
        "only revocations are listed",
        "const r = [...document.querySelectorAll('#audit-body tr')]; \
         return r.length === 1 && r[0].textContent.includes('key.revoked')",
    )
    .await;
    assert!(b.url().await.contains("action=key.revoked"));

    // Every control has a label, and nothing broke the page's policy.
    // The refused sign-in (401) and the refused create (400) are expected network errors.
    labelled_and_clean(&b).await;

    // Sign out forgets the token.
    b.click("#signout").await;
    b.find("#signin").await;
    assert_eq!(b.eval("return sessionStorage.length").await, 0);
    drop(b);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_shows_both_keys_and_the_page_fits_a_phone() {
    let (_up, gw) = setup().await;
    let (old, old_secret) = gw
        .create_key(keygate::keys::NewKey {
            name: "billing-sync".into(),
            scopes: vec!["read:/v1/**".into(), "write:/v1/orders/*".into()],
            ..new_key("acme", "production")
        })
        .await;
    let b = Browser::start(400, 800).await;
    b.goto(&format!(
        "http://{}/console?view=key&id={}",
        gw.admin, old.id
    ))
    .await;
    sign_in(&b, ADMIN_TOKEN).await;
    b.find("#view-key").await;
    b.click("#key-actions button[data-action=rotate]").await;
    b.find("#grace-field").await;
    b.click("#confirm-ok").await;
    b.find("#secret-old:not([hidden])").await;
    assert!(b.text("#secret-old").await.contains(&old.id));
    assert!(b.text("#secret-title").await.contains("billing-sync"));
    // Leaving the page while the secret is shown asks first.
    assert_eq!(
        b.eval("const e = new Event('beforeunload', {cancelable: true}); window.dispatchEvent(e); return e.defaultPrevented")
            .await,
        true
    );
    let new_secret = take_secret(&b).await;
    assert_eq!(
        b.eval("const e = new Event('beforeunload', {cancelable: true}); window.dispatchEvent(e); return e.defaultPrevented")
            .await,
        false,
        "once it is copied, leaving is free"
    );

    // Both keys work during the grace period; the page shows the old key's last use.
    for secret in [&old_secret, &new_secret] {
        let r = send(Req::get(gw.proxy, "/v1/x").bearer(secret)).await;
        assert_eq!(r.status, 200);
    }
    b.refresh().await;
    b.find("#rotation:not([hidden])").await;
    let notice = b.text("#rotation").await;
    assert!(notice.contains(&old.id), "{notice}");
    assert!(notice.contains("Not yet safe to revoke"), "{notice}");
    assert!(notice.contains("127.0.0.1"), "{notice}");

    // Edit the new key's limit: the form warns first, and the new limit applies at once.
    let new_id = b
        .eval("return new URLSearchParams(location.search).get('id')")
        .await;
    let new_id = new_id.as_str().unwrap().to_string();
    assert_ne!(new_id, old.id);
    b.click("#key-actions button[data-action=edit]").await;
    assert!(b.text("#edit-warning").await.contains("may start failing"));
    // Each pre-filled scope row is labelled by its place.
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#scopes .scope button')].map(x => x.getAttribute('aria-label')).join(', ')")
            .await,
        "Remove scope 1, Remove scope 2"
    );
    b.type_into("#f-rate", "1/min").await;
    b.click("#key-form-submit").await;
    b.wait_until(
        "the change is shown",
        "return /Saved/.test(document.querySelector('#flash').textContent) && \
         document.querySelector('#key-facts').textContent.includes('1/m')",
    )
    .await;
    let first = send(Req::get(gw.proxy, "/v1/x").bearer(&new_secret)).await;
    let second = send(Req::get(gw.proxy, "/v1/x").bearer(&new_secret)).await;
    assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 429));

    // Disable, then enable.
    b.click("#key-actions button[data-action=disable]").await;
    assert!(b
        .text("#confirm-text")
        .await
        .contains("401 until it is enabled"));
    b.click("#confirm-ok").await;
    b.find("#key-actions button[data-action=enable]").await;
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&new_secret)).await;
    assert_eq!(r.code(), "inactive_key");
    b.click("#key-actions button[data-action=enable]").await;
    b.click("#confirm-ok").await;
    b.find("#key-actions button[data-action=disable]").await;
    gw.clock.advance(std::time::Duration::from_secs(61));
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&new_secret)).await;
    assert_eq!(r.status, 200);

    // At 400 px nothing scrolls sideways. The list marks the old key as rotating out, with
    // its successor, and the new key as its replacement.
    b.click("#back").await;
    wait_rows(&b, 2).await;
    let old_status = b
        .text(&format!(
            "#keys-body tr[data-key-id='{}'] td[data-label='Status']",
            old.id
        ))
        .await;
    assert!(
        old_status.contains("Rotating out")
            && old_status.contains("expires in")
            && old_status.contains(&new_id),
        "{old_status}"
    );
    let new_status = b
        .text(&format!(
            "#keys-body tr[data-key-id='{new_id}'] td[data-label='Status']"
        ))
        .await;
    assert!(
        new_status.contains("Active") && new_status.contains(&format!("replaces {}", old.id)),
        "{new_status}"
    );
    let fits = b
        .eval("return document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(fits, true, "the keys page fits 400 px");
    b.screenshot(&artifacts().join("keys-400px.png")).await;
    drop(b);
    gw.stop().await;
}

#[tokio::test]
async fn the_console_is_served_without_a_token_and_with_a_strict_policy() {
    let (_up, gw) = setup().await;
    for path in [
        "/",
        "/console",
        "/console/console.js",
        "/console/console.css",
    ] {
        let r = send(Req::get(gw.admin, path)).await;
        assert_eq!(r.status, 200, "{path}");
        let csp = r.header("content-security-policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        // HEAD answers as GET does, without the body.
        let head = send(Req::get(gw.admin, path).method("HEAD")).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_eq!(head.header("content-type"), r.header("content-type"));
        assert!(head.body.is_empty());
    }
    // The API behind it still needs the token.
    let r = send(Req::get(gw.admin, "/v1/api-keys")).await;
    assert_eq!(r.status, 401);
    let r = send(Req::get(gw.admin, "/console/../v1/api-keys")).await;
    assert_ne!(r.status, 200);
    gw.stop().await;
}

/// A namespace at its tier's cap: the count says so in the singular, "Create API key" waits,
/// and the page says why, with the way to the keys that could be revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tier_is_explained_before_the_form() {
    let (_up, gw) = setup().await;
    let b = Browser::start(1440, 900).await;
    b.goto(&format!("http://{}/console?ns=solo", gw.admin))
        .await;
    sign_in(&b, ADMIN_TOKEN).await;
    b.find("#view-keys").await;
    assert_eq!(b.text("#ns-usage").await, "0 of 1 key, One");
    assert_eq!(b.property("#empty-create", "disabled").await, false);
    gw.create_key(keygate::keys::NewKey {
        name: "only-one".into(),
        ..new_key("solo", "production")
    })
    .await;
    b.refresh().await;
    wait_rows(&b, 1).await;
    assert_eq!(b.text("#ns-usage").await, "1 of 1 key, One");
    assert_eq!(b.property("#create", "disabled").await, true);
    let cap = b.text("#cap").await;
    assert!(
        cap.contains("solo has 1 of the 1 key its one tier allows") && cap.contains("Revoke"),
        "{cap}"
    );
    assert_eq!(
        b.eval("return document.querySelector('#create').getAttribute('aria-describedby')")
            .await,
        "cap"
    );
    // Another namespace is not held back.
    b.eval("const s = document.querySelector('#namespace'); s.value = 'acme'; s.dispatchEvent(new Event('change')); return true")
        .await;
    b.wait_until(
        "acme is shown",
        "return document.querySelector('#ns-usage').textContent.startsWith('0 of 10')",
    )
    .await;
    assert_eq!(b.property("#create", "disabled").await, false);
    assert!(b.all("#cap:not([hidden])").await.is_empty());
    drop(b);
    gw.stop().await;
}

const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

/// Presses Tab until the focused element matches `css` (at most 60 times).
async fn tab_to(b: &Browser, css: &str) {
    let script = format!(
        "return document.activeElement?.matches({}) === true",
        serde_json::Value::from(css)
    );
    for _ in 0..60 {
        if b.eval(&script).await == true {
            return;
        }
        b.press(TAB).await;
    }
    panic!("Tab never reached {css}");
}

/// The main workflow by keyboard alone: sign in, create a key, take its secret, and revoke
/// it from the row's menu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_from_the_keyboard_alone() {
    let (_up, gw) = setup().await;
    let b = Browser::start(1440, 900).await;
    b.goto(&format!("http://{}/console", gw.admin)).await;
    b.find("#token").await;
    assert_eq!(b.eval("return document.activeElement.id").await, "token");
    b.press(&format!("{ADMIN_TOKEN}{ENTER}")).await;
    b.find("#view-keys").await;

    tab_to(&b, "#empty-create").await;
    b.press(ENTER).await;
    b.find("#key-form[open]").await;
    assert_eq!(b.eval("return document.activeElement.id").await, "f-name");
    b.press("by-keyboard").await;
    tab_to(&b, "#key-form-submit").await;
    b.press(ENTER).await;
    b.find("#secret[open]").await;
    let secret = b.property("#secret-value", "value").await;
    let secret = secret.as_str().unwrap_or_default().to_string();
    support::ledger::secret(&secret);
    tab_to(&b, "#ack").await;
    b.press(" ").await;
    tab_to(&b, "#secret-done").await;
    b.press(ENTER).await;
    b.wait_until(
        "the secret dialog closes",
        "return !document.querySelector('#secret').open",
    )
    .await;
    wait_rows(&b, 1).await;
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&secret)).await;
    assert_eq!(r.status, 200);

    // The row's menu opens with Enter, and its Revoke asks first.
    tab_to(&b, "#keys-body details.menu summary").await;
    b.press(ENTER).await;
    b.find("#keys-body details.menu[open] button.danger-text")
        .await;
    tab_to(&b, "#keys-body details.menu[open] button.danger-text").await;
    b.press(ENTER).await;
    b.find("#confirm[open]").await;
    assert_eq!(
        b.eval("return document.activeElement.id").await,
        "confirm-cancel",
        "the safe choice has the focus"
    );
    tab_to(&b, "#confirm-ok").await;
    b.press(ENTER).await;
    wait_rows(&b, 0).await;
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&secret)).await;
    assert_eq!(r.code(), "revoked_key");
    drop(b);
    gw.stop().await;
}

/// The pictures README shows, at 1440 and 400 px: the list, the list during a rotation,
/// create with a server refusal, the secret, a key's detail and the audit log. They go to
/// `target/console/docs/`; the ones in `docs/` were copied from there and looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_for_the_readme() {
    let (_up, gw) = setup().await;
    let (billing, billing_secret) = gw
        .create_key(keygate::keys::NewKey {
            name: "billing-sync".into(),
            scopes: vec!["read:/v1/**".into(), "write:/v1/orders/*".into()],
            rate_limit: Some("100/s".into()),
            note: "nightly invoice export".into(),
            ..new_key("acme", "production")
        })
        .await;
    gw.create_key(keygate::keys::NewKey {
        name: "analytics".into(),
        allowed_cidrs: vec!["10.0.0.0/8".into()],
        ..new_key("acme", "production")
    })
    .await;
    for path in ["/v1/x", "/v1/y", "/admin/z"] {
        send(Req::get(gw.proxy, path).bearer(&billing_secret)).await;
    }
    for rule in [
        serde_json::json!({"name": "acme-hot", "namespace": "acme", "requests_per_minute": 1000}),
        serde_json::json!({"name": "billing-errors", "key": billing.id, "error_rate_percent": 5, "over": "15m"}),
    ] {
        assert_eq!(
            admin(&gw, "POST", "/v1/alerts", Some(rule)).await.status,
            201
        );
    }
    gw.gateway().housekeeping();
    let out = artifacts().join("docs");
    for (width, height) in [(1440u32, 900u32), (400, 860)] {
        let shot = |name: &str| out.join(format!("console-{name}-{width}.png"));
        let b = Browser::start(width, height).await;
        b.goto(&format!("http://{}/console", gw.admin)).await;
        sign_in(&b, ADMIN_TOKEN).await;
        wait_rows(&b, 2 + usize::from(width == 400)).await;
        b.screenshot(&shot("keys")).await;

        b.click(&format!(
            "#keys-body tr[data-key-id='{}'] td[data-label='Name'] a",
            billing.id
        ))
        .await;
        b.find("#view-key").await;
        b.wait_until(
            "the chart is drawn",
            "return document.querySelector('#chart svg') !== null",
        )
        .await;
        b.screenshot(&shot("key-detail")).await;

        if width == 1440 {
            // Rotate once: the 400 px pass then shows the rotation too.
            b.click("#key-actions button[data-action=rotate]").await;
            b.click("#confirm-ok").await;
        } else {
            b.click("#key-actions button[data-action=regenerate]").await;
            b.click("#confirm-ok").await;
        }
        b.find("#secret[open]").await;
        let secret = b.property("#secret-value", "value").await;
        support::ledger::secret(secret.as_str().unwrap_or_default());
        b.eval("document.querySelector('#secret-value').setSelectionRange(0, 0); return true")
            .await;
        b.screenshot(&shot("secret")).await;
        b.click("#ack").await;
        b.click("#secret-done").await;
        b.click("#back").await;
        wait_rows(&b, 3).await;
        b.screenshot(&shot("keys-rotation")).await;

        b.click("#create").await;
        b.find("#key-form[open]").await;
        b.type_into("#f-name", "reports").await;
        b.type_into("#f-rate", "5/fortnight").await;
        b.click("#key-form-submit").await;
        b.find("#e-rate_limit:not([hidden])").await;
        b.screenshot(&shot("create-refused")).await;
        // The refusal does not stretch the burst field beside it, and Cancel and Create stay
        // in view on a long form.
        let layout = b
            .eval(
                "const h = (id) => document.getElementById(id).getBoundingClientRect().height; \
                 const ok = document.querySelector('#key-form-submit').getBoundingClientRect(); \
                 return [Math.abs(h('f-burst') - h('f-name')) < 1, ok.bottom <= window.innerHeight && ok.top >= 0]",
            )
            .await;
        assert_eq!(layout, serde_json::json!([true, true]), "{width} px");
        b.click("#key-form-cancel").await;

        b.click("#nav-usage").await;
        b.wait_until(
            "the usage is drawn",
            "return document.querySelector('#usage-chart svg') !== null",
        )
        .await;
        b.screenshot(&shot("usage")).await;

        b.click("#nav-alerts").await;
        b.wait_until(
            "the rules are listed",
            "return document.querySelectorAll('#alerts-body tr[data-alert]').length === 2",
        )
        .await;
        b.screenshot(&shot("alerts")).await;

        b.click("#nav-audit").await;
        b.find("#view-audit").await;
        b.wait_until(
            "events are listed",
            "return document.querySelectorAll('#audit-body tr').length > 3",
        )
        .await;
        b.screenshot(&shot("audit")).await;
        drop(b);
    }
    gw.stop().await;
}

/// Alert rules from the console: the config's listed read-only, a rule made, refused with a
/// reason beside its field, edited and deleted, each step visible through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_are_managed_from_the_console() {
    let up = Upstream::start().await;
    let routes = route("/", up.addr, "production", "");
    let extra = "alerts:\n  rules:\n    - {name: everything-hot, requests_per_minute: 5000}\n";
    let gw = TestGateway::start(&config_yaml(&routes, extra)).await;
    let b = Browser::start(1440, 900).await;
    b.goto(&format!("http://{}/console?view=alerts", gw.admin))
        .await;
    sign_in(&b, ADMIN_TOKEN).await;
    b.find("#view-alerts").await;
    b.wait_until(
        "the config's rule is listed",
        "return document.querySelector('#alerts-body tr[data-alert=\"everything-hot\"]') !== null",
    )
    .await;
    let row = b.text("#alerts-body tr[data-alert='everything-hot']").await;
    assert!(
        row.contains("more than 5000 requests in a minute") && row.contains("edit in the config"),
        "{row}"
    );
    assert!(b
        .text("#alert-delivery")
        .await
        .contains("Email is not set up"));

    // Made from the form.
    b.click("#alert-new").await;
    b.find("#alert-form[open]").await;
    b.type_into("#a-name", "acme-errors").await;
    b.eval("const s = document.querySelector('#a-scope'); s.value = 'namespace'; s.dispatchEvent(new Event('change')); \
            const c = document.querySelector('#a-condition'); c.value = 'error_rate_percent'; c.dispatchEvent(new Event('change')); return true")
        .await;
    b.type_into("#a-target", "acme").await;
    b.type_into("#a-threshold", "250").await;
    b.click("#alert-form-submit").await;
    assert!(
        b.text("#ae-threshold").await.contains("0 to 100"),
        "checked in place"
    );
    b.type_into("#a-threshold", "25").await;
    b.eval("const o = document.querySelector('#a-over'); o.value = '15m'; return true")
        .await;
    b.click("#alert-form-submit").await;
    b.wait_until(
        "the rule is listed",
        "return document.querySelector('#alerts-body tr[data-alert=\"acme-errors\"]') !== null",
    )
    .await;
    let made = admin(&gw, "GET", "/v1/alerts/acme-errors", None)
        .await
        .json();
    assert_eq!(
        (
            made["namespace"].as_str(),
            made["error_rate_percent"].as_f64(),
            made["over"].as_str()
        ),
        (Some("acme"), Some(25.0), Some("15m"))
    );

    // The server's refusal, beside the field it names: a name in use.
    b.click("#alert-new").await;
    b.type_into("#a-name", "everything-hot").await;
    b.type_into("#a-threshold", "10").await;
    b.click("#alert-form-submit").await;
    b.find("#ae-form:not([hidden])").await;
    assert!(b.text("#ae-form").await.contains("exists already"));
    b.click("#alert-form-cancel").await;

    // Edited: the name stays, the threshold changes.
    b.click("#alerts-body tr[data-alert='acme-errors'] details.menu summary")
        .await;
    b.click("#alerts-body tr[data-alert='acme-errors'] details.menu button:not(.danger-text)")
        .await;
    b.find("#alert-form[open]").await;
    assert_eq!(b.property("#a-name", "disabled").await, true);
    b.type_into("#a-threshold", "40").await;
    b.click("#alert-form-submit").await;
    b.wait_until(
        "the change is listed",
        "return document.querySelector('#alerts-body tr[data-alert=\"acme-errors\"]').textContent.includes('40%')",
    )
    .await;
    let changed = admin(&gw, "GET", "/v1/alerts/acme-errors", None)
        .await
        .json();
    assert_eq!(
        (
            changed["error_rate_percent"].as_f64(),
            changed["over"].as_str()
        ),
        (Some(40.0), Some("15m"))
    );

    // Deleted, after a confirmation that says what stops.
    b.click("#alerts-body tr[data-alert='acme-errors'] details.menu summary")
        .await;
    b.click("#alerts-body tr[data-alert='acme-errors'] details.menu button.danger-text")
        .await;
    assert!(b
        .text("#confirm-text")
        .await
        .contains("stops being evaluated"));
    b.click("#confirm-ok").await;
    b.wait_until(
        "the rule is gone",
        "return document.querySelector('#alerts-body tr[data-alert=\"acme-errors\"]') === null",
    )
    .await;
    assert_eq!(
        admin(&gw, "GET", "/v1/alerts/acme-errors", None)
            .await
            .code(),
        "alert_not_found"
    );
    drop(b);
    gw.stop().await;
}

/// A key reported leaked is marked "Leaked" in the list and on its page, with where it was
/// found: a link for a web address, plain text for anything else (never a `javascript:`
/// link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_key_is_marked_with_where_it_was_found() {
    let (_up, gw) = setup().await;
    let (found, found_key) = gw.create_key(new_key("acme", "production")).await;
    let (odd, odd_key) = gw.create_key(new_key("acme", "production")).await;
    let (_, _) = gw.create_key(new_key("acme", "production")).await;
    let url = "https://github.com/acme/app/blob/0a1b/.env";
    for (key, source) in [(&found_key, url), (&odd_key, "javascript:alert(1)")] {
        let r = admin(
            &gw,
            "POST",
            "/v1/api-keys/leaked",
            Some(serde_json::json!({"keys": [key], "action": "report", "source": source})),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let b = Browser::start(1440, 900).await;
    b.goto(&format!("http://{}/console?ns=acme", gw.admin))
        .await;
    sign_in(&b, ADMIN_TOKEN).await;
    wait_rows(&b, 3).await;
    let marks = b
        .eval(
            "return [...document.querySelectorAll('#keys-body tr')].map(r => [r.dataset.keyId, \
             r.querySelector('.badge.leaked')?.textContent ?? null, \
             r.querySelector('td[data-label=Status] a')?.getAttribute('href') ?? null])",
        )
        .await;
    let marks: Vec<(String, Option<String>, Option<String>)> =
        serde_json::from_value(marks).unwrap();
    for (id, badge, link) in &marks {
        if *id == found.id {
            assert_eq!(
                (badge.as_deref(), link.as_deref()),
                (Some("Leaked"), Some(url))
            );
        } else if *id == odd.id {
            assert_eq!((badge.as_deref(), link.as_deref()), (Some("Leaked"), None));
        } else {
            assert_eq!(badge, &None, "a key never reported");
        }
    }
    assert!(b
        .text(&format!("tr[data-key-id='{}']", odd.id))
        .await
        .contains("javascript:alert(1)"));
    b.goto(&format!(
        "http://{}/console?ns=acme&view=key&id={}",
        gw.admin, found.id
    ))
    .await;
    b.wait_until(
        "the key's page says it leaked",
        "return [...document.querySelectorAll('#key-facts dt')].some(d => d.textContent === 'Leaked')",
    )
    .await;
    assert!(b.text("#key-facts").await.contains(url));
    // Who used the key, and from where: the exposure window and the recent requests.
    for (ip, n) in [("127.0.0.1", 3), ("127.0.0.2", 2)] {
        for _ in 0..n {
            let r = send(
                Req::get(gw.proxy, "/v1/orders?token=x")
                    .bearer(&found_key)
                    .from(ip),
            )
            .await;
            assert_eq!(r.status, 200);
        }
    }
    b.refresh().await;
    b.wait_until(
        "the exposure window lists both addresses",
        "return document.querySelectorAll('#exposure-addresses li').length === 2",
    )
    .await;
    let by_ip = b
        .eval("return [...document.querySelectorAll('#exposure-addresses li')].map(l => [l.dataset.ip, l.textContent])")
        .await;
    assert_eq!(
        by_ip,
        serde_json::json!([["127.0.0.1", "127.0.0.1 3"], ["127.0.0.2", "127.0.0.2 2"]])
    );
    assert!(b
        .text("#exposure")
        .await
        .contains("5 requests from 2 addresses"));
    assert_eq!(b.all("#key-requests tr").await.len(), 5);
    assert!(
        !b.text("#key-requests").await.contains("token"),
        "no query string"
    );
    assert!(b.errors().await.is_empty(), "{:?}", b.errors().await);
    drop(b);
    gw.stop().await;
}

/// Sets a select's value as a person picking it would, so its `change` handler runs.
async fn choose(b: &Browser, css: &str, value: &str) {
    let script = format!(
        "const s = document.querySelector({}); s.value = {}; s.dispatchEvent(new Event('change')); return s.value",
        serde_json::Value::from(css),
        serde_json::Value::from(value)
    );
    assert_eq!(b.eval(&script).await, value, "{css} offers {value}");
}

/// Clicks `css` after scrolling it to the middle of its scroller, as a person would before
/// clicking a control that the dialog's sticky buttons cover.
async fn click_shown(b: &Browser, css: &str) {
    b.find(css).await;
    b.eval(&format!(
        "document.querySelector({}).scrollIntoView({{block: 'center'}}); return true",
        serde_json::Value::from(css)
    ))
    .await;
    b.click(css).await;
}

/// Records every admin API call the page makes from now on, as `[method, path, body]`.
async fn record_calls(b: &Browser) {
    b.eval(
        "window.sent = []; const real = window.fetch; \
         window.fetch = (url, o = {}) => { window.sent.push([o.method || 'GET', String(url), o.body ?? null]); return real(url, o); }; \
         return true",
    )
    .await;
}

/// The calls recorded since `record_calls` that changed something, bodies parsed.
async fn changes(b: &Browser) -> Vec<(String, String, serde_json::Value)> {
    let v = b
        .eval("return window.sent.filter(([m]) => m !== 'GET')")
        .await;
    v.as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let body = c[2]
                .as_str()
                .map(|t| serde_json::from_str(t).unwrap())
                .unwrap_or_default();
            (
                c[0].as_str().unwrap().to_string(),
                c[1].as_str().unwrap().to_string(),
                body,
            )
        })
        .collect()
}

/// A fact of the key's or identity's page (`#key-facts`, `#identity-facts`) by its term.
async fn fact(b: &Browser, facts: &str, term: &str) -> String {
    b.text(&format!("{facts} dd[data-fact='{term}']")).await
}

/// Identities and limited-use keys from the console. An identity is made from its form; a
/// key is made with that identity, credits, metadata and two named limits, after a bad limit
/// and oversized metadata are refused beside their fields; the API then holds exactly what
/// the form said. The key's page shows the identity as a link, the credits and the metadata
/// (as text: a `<script>` value stays text); credits are topped up and set; an edit sends
/// only what changed; the identity's page shows what its keys spent, is edited, and is
/// deleted after a confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_credits_and_metadata_are_managed_from_the_console() {
    let (_up, gw) = setup().await;
    let b = Browser::start(1440, 900).await;
    b.goto(&format!(
        "http://{}/console?ns=acme&view=identities",
        gw.admin
    ))
    .await;
    sign_in(&b, ADMIN_TOKEN).await;
    b.find("#view-identities").await;
    assert_eq!(
        b.eval("return document.querySelector('#nav-identities').getAttribute('aria-current')")
            .await,
        "page"
    );

    // An identity, from its form.
    b.click("#identity-empty-new").await;
    b.find("#identity-form[open]").await;
    assert_eq!(b.eval("return document.activeElement.id").await, "i-id");
    b.type_into("#i-id", "cus_123").await;
    b.click("#i-add-limit").await;
    b.type_into("#i-limits .limit .l-name", "hourly").await;
    b.type_into("#i-limits .limit .l-limit", "1000/h").await;
    b.type_into("#i-quota", "10000/day").await;
    b.type_into("#i-credits", "500").await;
    b.type_into("#i-refill", "500").await;
    choose(&b, "#i-interval", "monthly").await;
    b.type_into("#i-day", "15").await;
    b.click("#i-add-meta").await;
    b.type_into("#i-meta .m-name", "plan").await;
    b.type_into("#i-meta .m-value", "enterprise").await;
    b.click("#identity-form-submit").await;
    b.wait_until(
        "the identity is listed",
        "return document.querySelector('#identities-body tr[data-identity=\"cus_123\"]') !== null",
    )
    .await;
    let made = admin(&gw, "GET", "/v1/identities/cus_123", None)
        .await
        .json();
    assert_eq!(
        made["rate_limits"],
        serde_json::json!([{"name": "hourly", "limit": "1000/h"}])
    );
    assert_eq!(made["quota"], "10000/day");
    assert_eq!(made["credits"]["remaining"], 500);
    assert_eq!(
        made["credits"]["refill"],
        serde_json::json!({"amount": 500, "interval": "monthly", "day_of_month": 15})
    );
    assert_eq!(made["meta"], serde_json::json!({"plan": "enterprise"}));
    let row = b.text("#identities-body tr[data-identity='cus_123']").await;
    assert!(
        row.contains("hourly: 1000/h") && row.contains("10000/day") && row.contains("500"),
        "{row}"
    );
    // Made again, it is refused beside its id, not replaced.
    b.click("#identity-new").await;
    b.type_into("#i-id", "cus_123").await;
    b.click("#identity-form-submit").await;
    assert!(b.text("#ie-id").await.contains("exists already"));
    assert_eq!(b.eval("return document.activeElement.id").await, "i-id");
    b.click("#identity-form-cancel").await;
    assert_eq!(
        admin(&gw, "GET", "/v1/identities/cus_123", None)
            .await
            .json()["quota"],
        "10000/day"
    );

    // A key of that identity, with credits, metadata and two named limits.
    b.click("#nav-keys").await;
    b.click("#empty-create").await;
    b.find("#key-form[open]").await;
    b.type_into("#f-name", "billing-sync").await;
    b.type_into("#f-identity", "cus_123").await;
    // The identity field offers the identities there are.
    b.wait_until(
        "the identities are offered",
        "return [...document.querySelectorAll('#identity-ids option')].map(o => o.value).join() === 'cus_123'",
    )
    .await;
    for _ in 0..2 {
        b.click("#add-limit").await;
    }
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#limits input, #limits button')].map(x => x.getAttribute('aria-label')).join(', ')")
            .await,
        "Limit 1 name, Limit 1 rate, Limit 1 burst, Remove limit 1, \
         Limit 2 name, Limit 2 rate, Limit 2 burst, Remove limit 2"
    );
    b.type_into("#limits .limit:nth-child(1) .l-name", "burst")
        .await;
    b.type_into("#limits .limit:nth-child(1) .l-limit", "10/s")
        .await;
    b.type_into("#limits .limit:nth-child(2) .l-name", "hourly")
        .await;
    b.type_into("#limits .limit:nth-child(2) .l-limit", "1000/fortnight")
        .await;
    b.type_into("#limits .limit:nth-child(2) .l-burst", "50")
        .await;
    b.type_into("#f-credits", "100").await;
    b.type_into("#f-refill", "100").await;
    assert!(
        b.all("#f-day-field:not([hidden])").await.is_empty(),
        "a daily refill has no day"
    );
    b.click("#add-meta").await;
    b.type_into("#meta .meta-row .m-name", "plan").await;
    b.type_into("#meta .meta-row .m-value", "pro").await;
    b.click("#add-meta").await;
    b.type_into("#meta .meta-row:nth-child(2) .m-name", "note")
        .await;
    // Metadata larger than 4 KiB is refused beside the metadata, before anything is sent.
    b.eval(
        "const v = document.querySelector('#meta .meta-row:nth-child(2) .m-value'); \
         v.value = 'x'.repeat(5000); v.dispatchEvent(new Event('input', {bubbles: true})); return true",
    )
    .await;
    record_calls(&b).await;
    b.click("#key-form-submit").await;
    let too_large = b.text("#e-meta").await;
    assert!(
        too_large.contains("4,096 bytes") && too_large.ends_with('.'),
        "{too_large}"
    );
    assert_eq!(
        b.eval("return document.activeElement.matches('#meta .meta-row:nth-child(2) .m-value')")
            .await,
        true,
        "the value at fault has the focus"
    );
    b.screenshot(&artifacts().join("key-form-meta-too-large.png"))
        .await;
    assert!(changes(&b).await.is_empty(), "nothing was sent");
    // A value with markup in it is only text. The bad limit is the server's to refuse: its
    // refusal is shown beside the named limits, with the limit at fault focused.
    b.type_into(
        "#meta .meta-row:nth-child(2) .m-value",
        "<script>alert(1)</script><b>bold</b>",
    )
    .await;
    assert!(
        b.all("#e-meta:not([hidden])").await.is_empty(),
        "the error goes once the field is changed"
    );
    b.click("#key-form-submit").await;
    b.find("#e-rate_limits:not([hidden])").await;
    let refused = b.text("#e-rate_limits").await;
    assert!(
        refused.contains("“1000/fortnight” is not a rate") && !refused.contains('`'),
        "{refused}"
    );
    assert_eq!(
        b.eval("return document.activeElement.matches('#limits .limit:nth-child(2) .l-limit')")
            .await,
        true,
        "the limit at fault has the focus"
    );
    b.screenshot(&artifacts().join("key-form-limit-refused.png"))
        .await;
    assert!(b.all("#secret[open]").await.is_empty());
    b.type_into("#limits .limit:nth-child(2) .l-limit", "1000/h")
        .await;
    b.click("#key-form-submit").await;
    let secret = take_secret(&b).await;
    wait_rows(&b, 1).await;
    let id = rows(&b).await.remove(0);

    // The API holds exactly what the form said.
    let key = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None)
        .await
        .json();
    assert_eq!(key["identity"], "cus_123");
    assert_eq!(
        key["rate_limits"],
        serde_json::json!([
            {"name": "burst", "limit": "10/s"},
            {"name": "hourly", "limit": "1000/h", "burst": 50},
        ])
    );
    assert_eq!(key["credits"]["remaining"], 100);
    assert_eq!(
        key["credits"]["refill"],
        serde_json::json!({"amount": 100, "interval": "daily"})
    );
    assert_eq!(
        key["meta"],
        serde_json::json!({"plan": "pro", "note": "<script>alert(1)</script><b>bold</b>"})
    );
    for blank in ["rate_limit", "burst", "quota", "expires_at"] {
        assert_eq!(key[blank], serde_json::Value::Null, "{blank}: {key}");
    }
    // The list names the key's identity under its name.
    assert_eq!(
        b.text("#keys-body td[data-label='Name'] .sub").await,
        "identity cus_123"
    );
    // One line a limit, so that the column stays narrow.
    assert_eq!(
        b.text("#keys-body td[data-label='Rate limit']").await,
        "burst: 10/s\nhourly: 1000/h, burst 50"
    );

    // Spent once: by the key and by its identity.
    let r = send(Req::get(gw.proxy, "/v1/things").bearer(&secret)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The per-minute series is kept by housekeeping.
    gw.gateway().housekeeping();

    // The key's page: the identity as a link, the credits, and the metadata as text.
    b.click("#keys-body td[data-label='Name'] > a").await;
    b.find("#view-key").await;
    b.wait_until(
        "the facts are shown",
        "return document.querySelector('#key-facts dd[data-fact=Credits]') !== null",
    )
    .await;
    assert_eq!(fact(&b, "#key-facts", "Identity").await, "cus_123");
    let credits = fact(&b, "#key-facts", "Credits").await;
    assert!(
        credits.starts_with("99 left; refills to 100 each day at 00:00 UTC; next refill in "),
        "{credits}"
    );
    assert_eq!(
        fact(&b, "#key-facts", "Metadata").await,
        "plan: pro\nnote: <script>alert(1)</script><b>bold</b>"
    );
    assert_eq!(
        b.eval("return document.querySelectorAll('script').length + document.querySelectorAll('#key-facts b').length")
            .await,
        1,
        "the value is text: no element was made of it"
    );
    assert_eq!(
        fact(&b, "#key-facts", "Rate limit").await,
        "burst: 10/s\nhourly: 1000/h, burst 50"
    );

    // Top up: add, refused in place when it is no number, then set.
    b.click("#key-actions button[data-action=credits]").await;
    b.find("#topup[open]").await;
    assert!(b.text("#topup-now").await.contains("99 left"));
    assert_eq!(
        b.eval("return document.activeElement.id").await,
        "topup-amount"
    );
    b.type_into("#topup-amount", "0").await;
    b.click("#topup-ok").await;
    assert!(b.text("#topup-error").await.contains("from 1"));
    assert!(changes(&b)
        .await
        .iter()
        .all(|(_, path, _)| !path.ends_with("/credits")));
    b.type_into("#topup-amount", "25").await;
    b.click("#topup-ok").await;
    b.wait_until(
        "the balance is shown",
        "return document.querySelector('#key-facts dd[data-fact=Credits]')?.textContent.startsWith('124 left')",
    )
    .await;
    assert!(b.text("#flash").await.contains("Added 25 credits"));
    b.click("#key-actions button[data-action=credits]").await;
    b.click("#topup-set").await;
    assert_eq!(b.text("#topup-ok").await, "Set credits");
    b.type_into("#topup-amount", "40").await;
    b.click("#topup-ok").await;
    b.wait_until(
        "the balance is shown",
        "return document.querySelector('#key-facts dd[data-fact=Credits]')?.textContent.startsWith('40 left')",
    )
    .await;
    let key = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None)
        .await
        .json();
    assert_eq!(key["credits"]["remaining"], 40);
    let topups: Vec<_> = changes(&b)
        .await
        .into_iter()
        .filter(|(_, path, _)| path.ends_with("/credits"))
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(
        topups,
        [
            serde_json::json!({"add": 25}),
            serde_json::json!({"set": 40})
        ]
    );

    // An edit sends only what changed: here, the metadata without its note.
    b.click("#key-actions button[data-action=edit]").await;
    b.find("#key-form[open]").await;
    assert_eq!(b.property("#f-identity", "value").await, "cus_123");
    assert_eq!(b.property("#f-credits", "value").await, "40");
    assert_eq!(
        b.eval("return document.querySelectorAll('#limits .limit').length")
            .await,
        2
    );
    click_shown(&b, "#meta .meta-row:nth-child(2) button").await;
    assert_eq!(
        b.eval("return document.activeElement.matches('#meta .meta-row:nth-child(1) .m-name')")
            .await,
        true,
        "the focus stays in the list"
    );
    b.click("#key-form-submit").await;
    b.wait_until(
        "the change is shown",
        "return document.querySelector('#key-facts dd[data-fact=Metadata]')?.textContent === 'plan: pro'",
    )
    .await;
    let patches: Vec<_> = changes(&b)
        .await
        .into_iter()
        .filter(|(method, _, _)| method == "PATCH")
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(patches, [serde_json::json!({"meta": {"plan": "pro"}})]);
    let key = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None)
        .await
        .json();
    assert_eq!(key["meta"], serde_json::json!({"plan": "pro"}));
    assert_eq!(key["credits"]["remaining"], 40, "the credits were not set");

    // The identity link leads to the identity: what all its keys spent, its limits.
    b.click("#key-facts dd[data-fact=Identity] a").await;
    b.find("#view-identity").await;
    b.wait_until(
        "the identity is shown",
        "return document.querySelector('#identity-facts dd[data-fact=Credits]') !== null",
    )
    .await;
    assert!(b.url().await.contains("view=identity&id=cus_123"));
    assert_eq!(b.text("#identity-title").await, "cus_123");
    assert_eq!(
        fact(&b, "#identity-facts", "Rate limits").await,
        "hourly: 1000/h"
    );
    assert!(fact(&b, "#identity-facts", "Quota")
        .await
        .starts_with("10000/day (1 of 10,000 used, resets in"));
    assert!(fact(&b, "#identity-facts", "Credits")
        .await
        .starts_with("499 left; refills to 500 on day 15 of each month; next refill in"));
    assert_eq!(
        fact(&b, "#identity-facts", "Metadata").await,
        "plan: enterprise"
    );
    assert_eq!(fact(&b, "#identity-facts", "Requests today").await, "1");
    // Its keys are listed, each a link to the key.
    b.wait_until(
        "the identity's keys are listed",
        &format!(
            "return document.querySelector(\"#identity-keys li[data-key-id='{id}'] a\") !== null"
        ),
    )
    .await;
    assert_eq!(
        b.eval("return document.querySelectorAll('#identity-keys li[data-key-id]').length")
            .await,
        serde_json::json!(1)
    );
    b.wait_until(
        "the chart is drawn",
        "return document.querySelector('#identity-chart svg')?.dataset.accepted === '1'",
    )
    .await;

    // Edited from its page: a merge patch of the quota alone, so the credits keep counting.
    b.click("#identity-edit").await;
    b.find("#identity-form[open]").await;
    assert_eq!(b.property("#i-id", "disabled").await, true);
    b.type_into("#i-quota", "20000/day").await;
    b.click("#identity-form-submit").await;
    b.wait_until(
        "the change is shown",
        "return document.querySelector('#identity-facts dd[data-fact=Quota]')?.textContent.startsWith('20000/day')",
    )
    .await;
    let patches: Vec<_> = changes(&b)
        .await
        .into_iter()
        .filter(|(method, path, _)| method == "PATCH" && path.contains("/v1/identities/"))
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(patches, [serde_json::json!({"quota": "20000/day"})]);
    assert!(fact(&b, "#identity-facts", "Credits")
        .await
        .starts_with("499 left"));
    // A bad quota is the server's to refuse, beside the quota.
    b.click("#identity-edit").await;
    b.type_into("#i-quota", "5/fortnight").await;
    b.click("#identity-form-submit").await;
    b.find("#ie-quota:not([hidden])").await;
    assert_eq!(b.eval("return document.activeElement.id").await, "i-quota");
    b.click("#identity-form-cancel").await;

    // Deleted after a confirmation; its key keeps the name, and the link says what that means.
    b.click("#identity-delete").await;
    assert!(b
        .text("#confirm-text")
        .await
        .contains("Its keys keep working and keep the name"));
    b.click("#confirm-ok").await;
    b.find("#identities-empty").await;
    assert!(b
        .text("#flash")
        .await
        .contains("Deleted the identity cus_123"));
    assert_eq!(
        admin(&gw, "GET", "/v1/identities/cus_123", None)
            .await
            .code(),
        "identity_not_found"
    );
    b.goto(&format!(
        "http://{}/console?ns=acme&view=key&id={id}",
        gw.admin
    ))
    .await;
    b.click("#key-facts dd[data-fact=Identity] a").await;
    b.find("#identity-missing:not([hidden])").await;
    assert!(b
        .text("#identity-missing-text")
        .await
        .contains("share nothing but the name"));
    // And can be made again from there, its id filled in.
    b.click("#identity-missing-create").await;
    assert_eq!(b.property("#i-id", "value").await, "cus_123");
    b.click("#identity-form-submit").await;
    b.find("#identity-body:not([hidden])").await;
    assert_eq!(
        admin(&gw, "GET", "/v1/identities/cus_123", None)
            .await
            .status,
        200
    );

    labelled_and_clean(&b).await;
    drop(b);
    gw.stop().await;
}

/// Pictures of identities, credits, metadata and named limits at 1440 and 400 px, in
/// `target/console/docs/` beside the README's: the keys list naming identities, a key's
/// page, its edit form, the top-up dialog, the identities list, an identity's page and its
/// form. At 400 px nothing scrolls sideways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_of_identities_and_credits() {
    let (_up, gw) = setup().await;
    for (id, body) in [
        (
            "cus_8842",
            serde_json::json!({
                "rate_limits": [{"name": "per-second", "limit": "20/s"}, {"name": "hourly", "limit": "20000/h", "burst": 500}],
                "quota": "1000000/month",
                "credits": {"remaining": 250000, "refill": {"amount": 250000, "interval": "monthly", "day_of_month": 1}},
                "meta": {"plan": "enterprise", "company": "Globex Corporation", "account_manager": "j.doe@example.com"},
            }),
        ),
        (
            "cus_1017",
            serde_json::json!({"rate_limits": [{"name": "per-minute", "limit": "600/m"}], "meta": {"plan": "starter"}}),
        ),
    ] {
        let r = admin(&gw, "PUT", &format!("/v1/identities/{id}"), Some(body)).await;
        assert_eq!(r.status, 201, "{:?}", r.json());
    }
    let made = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(serde_json::json!({
            "namespace": "acme", "environment": "production", "name": "globex-orders",
            "identity": "cus_8842", "scopes": ["read:/v1/**", "write:/v1/orders/*"],
            "rate_limits": [{"name": "burst", "limit": "10/s"}, {"name": "hourly", "limit": "1000/h", "burst": 50}],
            "credits": {"remaining": 5000, "refill": {"amount": 5000, "interval": "daily"}},
            "meta": {"plan": "pro", "region": "eu-west-1", "owner": "orders team <orders@example.com>"},
            "note": "order sync for Globex",
        })),
    )
    .await;
    assert_eq!(made.status, 201, "{:?}", made.json());
    let key_id = made.json()["id"].as_str().unwrap().to_string();
    let secret = made.json()["key"].as_str().unwrap().to_string();
    support::ledger::secret(&secret);
    gw.create_key(keygate::keys::NewKey {
        name: "starter-app".into(),
        identity: Some("cus_1017".into()),
        rate_limit: Some("5/s".into()),
        ..new_key("acme", "production")
    })
    .await;
    for path in ["/v1/orders", "/v1/orders/7", "/v1/invoices"] {
        send(Req::get(gw.proxy, path).bearer(&secret)).await;
    }
    gw.gateway().housekeeping();

    let out = artifacts().join("docs");
    for (width, height) in [(1440u32, 900u32), (400, 860)] {
        let shot = |name: &str| out.join(format!("console-{name}-{width}.png"));
        let fits = async |b: &Browser, what: &str| {
            assert_eq!(
                b.eval("return document.documentElement.scrollWidth <= window.innerWidth")
                    .await,
                true,
                "{what} fits {width} px"
            );
        };
        let b = Browser::start(width, height).await;
        b.goto(&format!("http://{}/console?ns=acme", gw.admin))
            .await;
        sign_in(&b, ADMIN_TOKEN).await;
        wait_rows(&b, 2).await;
        b.screenshot(&shot("keys-identities")).await;
        fits(&b, "the keys").await;

        b.goto(&format!(
            "http://{}/console?ns=acme&view=key&id={key_id}",
            gw.admin
        ))
        .await;
        b.wait_until(
            "the chart is drawn",
            "return document.querySelector('#chart svg') !== null",
        )
        .await;
        if width == 400 {
            b.eval("document.querySelector('#key-facts dd[data-fact=Identity]').scrollIntoView(); return true")
                .await;
        }
        b.screenshot(&shot("key-credits")).await;
        fits(&b, "the key's page").await;

        b.click("#key-actions button[data-action=credits]").await;
        b.find("#topup[open]").await;
        b.type_into("#topup-amount", "1000").await;
        b.screenshot(&shot("topup")).await;
        b.click("#topup-cancel").await;

        b.click("#key-actions button[data-action=edit]").await;
        b.find("#key-form[open]").await;
        b.eval(
            "document.querySelector('#limits').closest('fieldset').scrollIntoView(); return true",
        )
        .await;
        b.screenshot(&shot("key-form-limits")).await;
        b.eval("document.querySelector('#meta').closest('fieldset').scrollIntoView({block: 'center'}); return true")
            .await;
        b.screenshot(&shot("key-form-meta")).await;
        b.click("#key-form-cancel").await;

        b.click("#nav-identities").await;
        b.wait_until(
            "the identities are listed",
            "return document.querySelectorAll('#identities-body tr').length === 2",
        )
        .await;
        b.screenshot(&shot("identities")).await;
        fits(&b, "the identities").await;

        b.click("#identities-body tr[data-identity='cus_8842'] td[data-label='Identity'] a")
            .await;
        b.wait_until(
            "the chart is drawn",
            "return document.querySelector('#identity-chart svg') !== null",
        )
        .await;
        b.screenshot(&shot("identity")).await;
        fits(&b, "the identity's page").await;

        b.click("#identity-edit").await;
        b.find("#identity-form[open]").await;
        b.screenshot(&shot("identity-form")).await;
        b.click("#identity-form-cancel").await;
        drop(b);
    }
    gw.stop().await;
}

/// Identities by keyboard alone: make one with a named limit (Add limit puts the focus in
/// the new row), then delete it from its row's menu after the confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_work_from_the_keyboard_alone() {
    let (_up, gw) = setup().await;
    let b = Browser::start(1440, 900).await;
    b.goto(&format!("http://{}/console?view=identities", gw.admin))
        .await;
    b.find("#token").await;
    b.press(&format!("{ADMIN_TOKEN}{ENTER}")).await;
    b.find("#identities-empty").await;

    tab_to(&b, "#identity-empty-new").await;
    b.press(ENTER).await;
    b.find("#identity-form[open]").await;
    assert_eq!(b.eval("return document.activeElement.id").await, "i-id");
    b.press("cus_kb").await;
    tab_to(&b, "#i-add-limit").await;
    b.press(ENTER).await;
    assert_eq!(
        b.eval("return document.activeElement.getAttribute('aria-label')")
            .await,
        "Limit 1 name"
    );
    b.press(&format!("hourly{TAB}100/h")).await;
    tab_to(&b, "#identity-form-submit").await;
    b.press(ENTER).await;
    b.wait_until(
        "the identity is listed",
        "return document.querySelector('#identities-body tr[data-identity=\"cus_kb\"]') !== null",
    )
    .await;
    assert_eq!(
        admin(&gw, "GET", "/v1/identities/cus_kb", None)
            .await
            .json()["rate_limits"],
        serde_json::json!([{"name": "hourly", "limit": "100/h"}])
    );

    tab_to(&b, "#identities-body details.menu summary").await;
    b.press(ENTER).await;
    tab_to(&b, "#identities-body details.menu[open] button.danger-text").await;
    b.press(ENTER).await;
    b.find("#confirm[open]").await;
    assert_eq!(
        b.eval("return document.activeElement.id").await,
        "confirm-cancel",
        "the safe choice has the focus"
    );
    tab_to(&b, "#confirm-ok").await;
    b.press(ENTER).await;
    b.find("#identities-empty").await;
    assert_eq!(
        admin(&gw, "GET", "/v1/identities/cus_kb", None)
            .await
            .code(),
        "identity_not_found"
    );
    drop(b);
    gw.stop().await;
}

//! The chat page: `GET /` and its three files under `/webui/`, embedded in the binary at
//! build time (plain HTML, CSS and JavaScript in `serve/webui/`; nothing is fetched at run
//! time and nothing needs a JavaScript toolchain to build).
//!
//! The page loads without the API key (it holds no secret, and it has to load to ask for
//! the key); everything it then calls is an API route behind the key. It stays behind the
//! Host and Origin checks every route has. Each file is answered with a strict
//! Content-Security-Policy: scripts only from this origin and never inline, no inline
//! styles, fetches only to this origin, no framing; model output is put in the page as
//! text nodes by `app.js`, and the policy is the second wall should that ever slip.

use std::sync::OnceLock;

use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use hyper::{HeaderMap, StatusCode};

use super::{full, Body};
use hyper::Response;

/// One embedded file: the path it is served at, its type, its bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_bytes!("../../webui/index.html") },
    Asset { path: "/webui/app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../../webui/app.js") },
    Asset { path: "/webui/app.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../../webui/app.css") },
    Asset { path: "/webui/icon.svg", content_type: "image/svg+xml", body: include_bytes!("../../webui/icon.svg") },
];


/// The policy every page file is served with: everything from this origin only, no inline
/// script or style, no plugins, no framing; and Trusted Types required, so the browser
/// itself refuses any assignment of a string to an HTML sink (`innerHTML` and the like),
/// which `app.js` never makes.
pub(super) const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                              object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
                              require-trusted-types-for 'script'";

/// A strong validator per file, computed once: the page changes only with the binary, and a
/// browser that revalidates gets 304 instead of the bytes.
fn etag(i: usize) -> &'static HeaderValue {
    static TAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                // FNV-1a: a content tag, not a security measure.
                let h = a.body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
                HeaderValue::from_str(&format!("\"{h:016x}\"")).expect("hex is a valid header value")
            })
            .collect()
    });
    &tags[i]
}

/// Answers the page file at `path` (one of the routing table's page routes), or 404.
pub(super) fn serve(path: &str, request: &HeaderMap) -> Response<Body> {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found");
    };
    let asset = &ASSETS[i];
    let tag = etag(i);
    // If-None-Match compares weakly (RFC 9110 13.1.2): a `W/` prefix still matches.
    let fresh = request.get(IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii).any(|t| t == b"*" || t.strip_prefix(b"W/").unwrap_or(t) == tag.as_bytes())
    });
    let mut r = if fresh { full(StatusCode::NOT_MODIFIED, asset.content_type, Bytes::new()) } else { full(StatusCode::OK, asset.content_type, Bytes::from_static(asset.body)) };
    let h = r.headers_mut();
    h.insert(ETAG, tag.clone());
    // Revalidate every time: a new binary must never run with an old script.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_file_is_embedded_and_the_page_names_only_embedded_files() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap();
        for a in &ASSETS[1..] {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            assert!(page.contains(&format!("\"{}\"", a.path)) || a.path.ends_with(".svg"), "the page does not load {}", a.path);
        }
        // Nothing from elsewhere, nothing inline that the policy would refuse anyway.
        assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"), "the page names another origin");
        assert!(!page.contains("<script>") && !page.contains(" style=") && !page.contains("<style"), "the page has inline script or style");
        let js = std::str::from_utf8(ASSETS[1].body).unwrap();
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "DOMParser", "createContextualFragment", "srcdoc", "document.write", "eval(", "new Function", "setTimeout('", "setTimeout(\""] {
            assert!(!js.contains(sink), "app.js uses {sink}: it must not build HTML or code from strings");
        }
    }

    #[test]
    fn a_matching_etag_answers_not_modified() {
        let mut h = HeaderMap::new();
        assert_eq!(serve("/", &h).status(), StatusCode::OK);
        h.insert(IF_NONE_MATCH, etag(0).clone());
        assert_eq!(serve("/", &h).status(), StatusCode::NOT_MODIFIED);
        let weak = format!("\"x\", W/{}", etag(0).to_str().unwrap());
        h.insert(IF_NONE_MATCH, HeaderValue::from_str(&weak).unwrap());
        assert_eq!(serve("/", &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(serve("/", &h).status(), StatusCode::OK);
        assert_eq!(serve("/webui/none.js", &h).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_routing_table_serves_every_page_file() {
        for a in ASSETS {
            assert_eq!(super::super::route_of(&hyper::Method::GET, a.path).ok(), Some(super::super::Route::Page), "{}", a.path);
            assert_eq!(super::super::route_of(&hyper::Method::HEAD, a.path).ok(), Some(super::super::Route::Page), "{}", a.path);
        }
    }
}

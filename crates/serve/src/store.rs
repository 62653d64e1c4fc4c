//! Stored completions (`minnow serve --store DIR`): what a chat request
//! that asks `"store": true` (every chat request, with `--store-all`)
//! records, and OpenAI's stored-completions API over the store
//! (`minnow_store::Store`).
//!
//! A record is written once the answer is whole and before the client is
//! told so: a plain response goes out after the record is durable, a
//! stream's `data: [DONE]` after it. So an answer a client received whole
//! is in the store even if the server is killed the next moment; one cut
//! short may or may not be (it is recorded if it finished generating).
//! A record that cannot be written (the store is full, the disk failed)
//! does not fail the answer: the server logs it and counts it in
//! `/metrics` (`minnow_store_failed_total`).
//!
//! The API, behind the API key like every `/v1` route:
//! - `GET /v1/chat/completions` `?model=&metadata[KEY]=VALUE&after=&limit=&order=asc|desc`
//! - `GET /v1/chat/completions/{id}`, `GET /v1/chat/completions/{id}/messages`
//! - `POST /v1/chat/completions/{id}` `{"metadata": {…}}` (replaces it)
//! - `DELETE /v1/chat/completions/{id}`
//!
//! Listings are in the order the answers were stored (`order=desc`: newest
//! first), 20 a page by default, 100 at most.

use crate::error::ApiError;
use crate::render::Shape;
use crate::{json_response, params, AppState};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use minnow_engine::scheduler::TokenLogprob;
use minnow_store::{ListQuery, Order, Store, StoreError, StoredCompletion, TeacherLogprobs};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// `--store DIR` and its options, with the store already open.
#[derive(Clone)]
pub struct StoreConfig {
    pub store: Arc<Mutex<Store>>,
    /// `--store-all`: record every chat request, `store` or not.
    pub all: bool,
    /// `--store-logprobs K`: also record the top-K log-probabilities of each
    /// reply token (0: none).
    pub logprobs: usize,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.store.lock().map(|s| s.dir().display().to_string()).unwrap_or_default();
        f.debug_struct("StoreConfig")
            .field("dir", &dir)
            .field("all", &self.all)
            .field("logprobs", &self.logprobs)
            .finish()
    }
}

/// Parameters of the body that are about storing, not about the request.
const NOT_RECORDED: [&str; 4] = ["store", "metadata", "stream", "stream_options"];

/// What one request records beyond its response while it is answered
/// (the response itself is built as the client's is: `Shape::full`).
pub(crate) struct Recording {
    request: Value,
    metadata: BTreeMap<String, String>,
    /// Top-K kept per token (0: none).
    k: usize,
    /// Per choice, the reply's token ids and their top-K (when `k > 0`).
    tokens: Vec<Vec<u32>>,
    top: Vec<Vec<Vec<(u32, f32)>>>,
}

/// Whether a chat request is recorded: `store` (a boolean) and `metadata`
/// checked either way; `store: true` without `--store` is a 400 rather than
/// an answer silently not kept.
pub(crate) fn recording_for(
    state: &AppState,
    obj: &Map<String, Value>,
    n: usize,
) -> Result<Option<Recording>, ApiError> {
    let store = params::opt_bool(obj, "store")?.unwrap_or(false);
    let metadata = params::metadata(obj.get("metadata"), "metadata")?;
    let Some(cfg) = &state.opts.store else {
        if store {
            return Err(ApiError::invalid(
                "store",
                "this server does not store completions: start it with `minnow serve --store DIR`",
            ));
        }
        return Ok(None);
    };
    if !store && !cfg.all {
        return Ok(None);
    }
    let request: Map<String, Value> =
        obj.iter().filter(|(k, _)| !NOT_RECORDED.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(Some(Recording {
        request: Value::Object(request),
        metadata,
        k: cfg.logprobs,
        tokens: vec![Vec::new(); n],
        top: vec![Vec::new(); n],
    }))
}

impl Recording {
    /// The top-K the engine must compute for this recording.
    pub fn top_k(&self) -> usize {
        self.k
    }

    /// A reply token of choice `index`.
    pub fn token(&mut self, index: usize, id: u32, lp: Option<&TokenLogprob>) {
        let Some(ids) = self.tokens.get_mut(index) else { return };
        ids.push(id);
        if let (Some(lp), true) = (lp, self.k > 0) {
            self.top[index].push(lp.top.iter().take(self.k).copied().collect());
        }
    }

    /// The record, with `response` as a non-streaming client gets it.
    pub fn into_record(self, state: &AppState, shape: &Shape, response: Value) -> StoredCompletion {
        let logprobs = if self.k > 0 {
            self.tokens
                .into_iter()
                .zip(self.top)
                .map(|(tokens, top)| TeacherLogprobs { vocab: Some(state.vocab.clone()), tokens, top })
                .collect()
        } else {
            Vec::new()
        };
        StoredCompletion {
            id: shape.id.clone(),
            created: shape.created,
            model: shape.model.clone(),
            metadata: self.metadata,
            request: self.request,
            response,
            logprobs,
        }
    }
}

/// Writes a record (on the calling thread: it waits for `fsync`). A failure
/// is logged and counted, never returned: the answer stands.
pub(crate) fn save_blocking(state: &AppState, rec: StoredCompletion) {
    let Some(cfg) = &state.opts.store else { return };
    let id = rec.id.clone();
    let r = cfg.store.lock().unwrap_or_else(|e| e.into_inner()).put(&rec);
    match r {
        Ok(()) => state.metrics.store_written.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        Err(e) => {
            eprintln!("minnow serve: warning: {id} was answered but not stored: {e}");
            state.metrics.store_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        }
    };
}

/// [`save_blocking`] off the async threads.
pub(crate) async fn save(state: Arc<AppState>, rec: StoredCompletion) {
    let _ = tokio::task::spawn_blocking(move || save_blocking(&state, rec)).await;
}

fn store_of(state: &AppState) -> Result<&Arc<Mutex<Store>>, ApiError> {
    state.opts.store.as_ref().map(|c| &c.store).ok_or_else(|| {
        ApiError::not_found("this server does not store completions: start it with `minnow serve --store DIR`")
    })
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(id) => ApiError::not_found(format!("No chat completion found with id '{id}'.")),
        e => ApiError::internal(e.to_string()),
    }
}

/// Runs a store operation on the blocking pool (it may read or `fsync`).
async fn with_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store_of(state)?.clone();
    tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
        .map_err(store_error)
}

/// `%XX` and `+` decoded (`application/x-www-form-urlencoded`).
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string as decoded pairs, in order.
fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

/// `after`, `limit` (1..=100, default 20) and `order` of a listing.
fn page_params(pairs: &[(String, String)]) -> Result<(Option<String>, usize, Order), ApiError> {
    let mut after = None;
    let mut limit = 20;
    let mut order = Order::Asc;
    for (k, v) in pairs {
        match k.as_str() {
            "after" if !v.is_empty() => after = Some(v.clone()),
            "limit" => {
                limit = v.parse::<usize>().ok().filter(|l| (1..=100).contains(l)).ok_or_else(|| {
                    ApiError::invalid("limit", format!("`limit` must be an integer from 1 to 100, got {v:?}"))
                })?
            }
            "order" => {
                order = match v.as_str() {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    _ => return Err(ApiError::invalid("order", format!("`order` must be asc or desc, got {v:?}"))),
                }
            }
            _ => {}
        }
    }
    Ok((after, limit, order))
}

fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    json!({"object": "list", "first_id": id(data.first()), "last_id": id(data.last()), "has_more": has_more, "data": data})
}

/// `GET /v1/chat/completions`.
pub async fn list(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let r = async {
        let pairs = query_pairs(&uri);
        let (after, limit, order) = page_params(&pairs)?;
        let mut q = ListQuery { after, limit, order, ..Default::default() };
        for (k, v) in &pairs {
            if k == "model" {
                q.model = Some(v.clone());
            } else if let Some(key) = k.strip_prefix("metadata[").and_then(|k| k.strip_suffix(']')) {
                q.metadata.push((key.to_string(), v.clone()));
            }
        }
        store_of(&state)?;
        // The one id a listing looks up is `after`'s.
        let page = with_store(&state, move |s| s.list(&q)).await.map_err(|e| {
            if e.status == axum::http::StatusCode::NOT_FOUND {
                e.with_param("after")
            } else {
                e
            }
        })?;
        let data = page.records.iter().map(StoredCompletion::api_object).collect();
        Ok::<_, ApiError>(json_response(&list_object(data, page.has_more)))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn get_record(state: &AppState, id: String) -> Result<StoredCompletion, ApiError> {
    let key = id.clone();
    with_store(state, move |s| s.get(&key).map_err(StoreError::Io)?.ok_or(StoreError::NotFound(key))).await
}

/// `GET /v1/chat/completions/{id}`.
pub async fn get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match get_record(&state, id).await {
        Ok(r) => json_response(&r.api_object()),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/chat/completions/{id}/messages`: the request's messages, each
/// with an id (`{completion id}-{index}`), paged like a listing.
pub async fn messages(State(state): State<Arc<AppState>>, Path(id): Path<String>, uri: Uri) -> Response {
    let r = async {
        let (after, limit, order) = page_params(&query_pairs(&uri))?;
        let rec = get_record(&state, id).await?;
        let mut items: Vec<Value> = rec
            .messages()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut m = m.clone();
                if let Value::Object(o) = &mut m {
                    o.insert("id".into(), json!(format!("{}-{i}", rec.id)));
                    o.entry("content_parts").or_insert(Value::Null);
                }
                m
            })
            .collect();
        if order == Order::Desc {
            items.reverse();
        }
        let start = match after {
            None => 0,
            Some(a) => items
                .iter()
                .position(|m| m["id"] == a.as_str())
                .map(|i| i + 1)
                .ok_or_else(|| ApiError::invalid("after", format!("no message of {} has id {a:?}", rec.id)))?,
        };
        let has_more = items.len() > start + limit;
        let page = items.into_iter().skip(start).take(limit).collect();
        Ok::<_, ApiError>(json_response(&list_object(page, has_more)))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions/{id}` `{"metadata": {…}}`: replaces the metadata.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let obj = crate::handlers::read_object(&state, &headers, body).await?;
        let Some(m) = obj.get("metadata") else {
            return Err(ApiError::invalid(
                "metadata",
                "`metadata` is required: the only field a stored completion may change",
            )
            .with_code("missing_parameter"));
        };
        let metadata = params::metadata(Some(m), "metadata")?;
        let rec = with_store(&state, move |s| s.update_metadata(&id, metadata)).await?;
        Ok(json_response(&rec.api_object()))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/chat/completions/{id}`.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let key = id.clone();
    match with_store(&state, move |s| s.delete(&key)).await {
        Ok(true) => json_response(&json!({"object": "chat.completion.deleted", "id": id, "deleted": true})),
        Ok(false) => store_error(StoreError::NotFound(id)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_as_forms_do() {
        let uri: Uri =
            "/v1/chat/completions?metadata%5Btask%5D=orders+x&limit=5&after=chatcmpl-1&bad=%zz&end=%4".parse().unwrap();
        let p = query_pairs(&uri);
        assert_eq!(p[0], ("metadata[task]".to_string(), "orders x".to_string()));
        assert_eq!(p[1], ("limit".to_string(), "5".to_string()));
        assert_eq!(p[3], ("bad".to_string(), "%zz".to_string()));
        assert_eq!(p[4], ("end".to_string(), "%4".to_string()));
        assert_eq!(page_params(&p).unwrap(), (Some("chatcmpl-1".to_string()), 5, Order::Asc));
        assert!(page_params(&[("limit".into(), "0".into())]).is_err());
        assert!(page_params(&[("order".into(), "up".into())]).is_err());
    }
}

//! Errors at the HTTP edge, each mapped to a status code and an OpenAI-shaped body:
//! `{"error": {"message", "type", "param", "code"}}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or a body that is not the request's shape.
    #[error("{0}")]
    BadRequest(String),
    /// A parameter out of its range or of the wrong type (named in `param`).
    #[error("{message}")]
    InvalidParameter { param: String, message: String },
    /// Prompt plus requested completion exceed the context; `param` is `prompt` or `messages`.
    #[error("{message}")]
    ContextOverflow { param: String, message: String },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    Unauthorized(String),
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull { waiting: usize, retry_after_s: u64 },
    #[error("the server is shutting down")]
    Draining,
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter { param: param.to_owned(), message: message.into() }
    }

    /// OpenAI's `type` and `code` strings.
    fn kind_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidParameter { .. } => ("invalid_request_error", None),
            ApiError::ContextOverflow { .. } => ("invalid_request_error", Some("context_length_exceeded")),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge { .. } => ("invalid_request_error", Some("payload_too_large")),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::QueueFull { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::Draining => ("server_error", Some("shutting_down")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    /// The body alone (streams report an error mid-way as one more event of this shape).
    pub fn body_json(&self) -> String {
        let (kind, code) = self.kind_code();
        let param = match self {
            ApiError::InvalidParameter { param, .. } => Some(param.as_str()),
            ApiError::ContextOverflow { param, .. } => Some(param.as_str()),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        };
        let body = Body { error: Detail { message: self.to_string(), kind, param, code } };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidParameter { .. } | ApiError::ContextOverflow { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
        match self {
            ApiError::QueueFull { retry_after_s, .. } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_s.to_string()));
            }
            ApiError::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::Draining => {
                resp.insert_header((header::CONNECTION, HeaderValue::from_static("close")));
            }
            _ => {}
        }
        resp.body(self.body_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = ApiError::param("temperature", "temperature must be in [0, 2], got 7");
        let v: serde_json::Value = serde_json::from_str(&e.body_json()).unwrap();
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("got 7"));
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        let q = ApiError::QueueFull { waiting: 3, retry_after_s: 1 };
        assert_eq!(q.status_code(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(q.error_response().headers().get(header::RETRY_AFTER).unwrap(), "1");
    }
}

//! Every error the API returns, and the one table that maps each to an HTTP status and an
//! OpenAI-style `{"error": {"message", "type", "param", "code"}}` body.

use hyper::StatusCode;

use super::openai::{ErrorBody, ErrorResponse};
use crate::engine::RequestError;
use crate::tokenizer::TemplateError;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Malformed JSON, wrong types, values out of range, prompts beyond the context.
    BadRequest {
        message: String,
        param: Option<String>,
    },
    Unauthorized,
    NotFound(String),
    MethodNotAllowed {
        allowed: &'static str,
    },
    PayloadTooLarge {
        limit: usize,
    },
    /// The body did not arrive within `--request-read-timeout`.
    RequestTimeout {
        seconds: u64,
    },
    /// The request's target is longer than the server reads.
    UriTooLong {
        limit: usize,
    },
    /// The request's headers are more or longer than the server reads.
    HeadersTooLarge {
        what: String,
    },
    /// The waiting queue is full; retry after this many seconds.
    QueueFull {
        retry_after_secs: u64,
    },
    /// Loading or draining.
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::BadRequest { message: message.into(), param: param.map(str::to_string) }
    }

    /// The table: status and error type for each kind of error.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "BadRequestError"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFoundError"),
            ApiError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowedError"),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeError"),
            ApiError::RequestTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutError"),
            ApiError::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "UriTooLongError"),
            ApiError::HeadersTooLarge { .. } => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "RequestHeaderFieldsTooLargeError")
            }
            ApiError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "RateLimitError"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest { message, .. } => message.clone(),
            ApiError::Unauthorized => "invalid or missing API key: send it as 'Authorization: Bearer <key>'".into(),
            ApiError::NotFound(what) => what.clone(),
            ApiError::MethodNotAllowed { allowed } => format!("method not allowed; this route accepts {allowed}"),
            ApiError::PayloadTooLarge { limit } => format!("request body is larger than the limit of {limit} bytes"),
            ApiError::RequestTimeout { seconds } => {
                format!("the request body did not arrive within {seconds} s (--request-read-timeout)")
            }
            ApiError::UriTooLong { limit } => format!("the request's target is longer than {limit} bytes"),
            ApiError::HeadersTooLarge { what } => format!("the request's headers are too large: {what}"),
            ApiError::QueueFull { retry_after_secs } => {
                format!("the server's request queue is full; retry in {retry_after_secs} s")
            }
            ApiError::Unavailable(why) => why.clone(),
            ApiError::Internal(what) => what.clone(),
        }
    }

    pub fn body(&self) -> ErrorResponse {
        let (status, kind) = self.status_and_type();
        let param = match self {
            ApiError::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        ErrorResponse { error: ErrorBody { message: self.message(), kind, param, code: status.as_u16() } }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        ApiError::BadRequest { param: e.param().map(str::to_string), message: e.to_string() }
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> ApiError {
        ApiError::bad_request(e.to_string(), Some("messages"))
    }
}

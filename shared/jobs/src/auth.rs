//! Optional bearer-token authentication. The token comes from a file or an environment variable;
//! requests carry `authorization: Bearer <token>`, compared in constant time.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerAuth {
    token: Option<std::sync::Arc<Vec<u8>>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        Self { token: token.map(|t| std::sync::Arc::new(t.trim().as_bytes().to_vec())) }
    }

    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// The tonic interceptor.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization: Bearer <token>)"))?;
        if bool::from(given.trim().as_bytes().ct_eq(expected.as_slice())) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// Reads the token from `file` if given, else from `value`; empty means no authentication.
pub fn load_token(file: Option<&std::path::Path>, value: Option<&str>) -> anyhow::Result<Option<String>> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("auth token file {}: {e}", f.display()))?,
        None => value.unwrap_or_default().to_string(),
    };
    let token = token.trim().to_string();
    Ok((!token.is_empty()).then_some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_are_checked() {
        let auth = BearerAuth::new(Some("s3cret".into()));
        assert!(auth.check(req(Some("Bearer s3cret"))).is_ok());
        assert_eq!(auth.check(req(Some("Bearer wrong"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.check(req(Some("Bearer s3cret-longer"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.check(req(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).check(req(None)).is_ok());
    }
}

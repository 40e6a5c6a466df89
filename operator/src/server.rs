//! `/metrics` (Prometheus text) and `/health` over actix-web.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, get, web};
use prometheus_client::registry::Registry;

#[get("/health")]
async fn health() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

#[get("/metrics")]
async fn metrics(registry: web::Data<Arc<Registry>>) -> HttpResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => {
            HttpResponse::Ok().content_type("application/openmetrics-text; version=1.0.0; charset=utf-8").body(text)
        }
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

/// Serves on `listener` (port 0 in tests); returns the server to await.
pub fn serve(listener: TcpListener, registry: Arc<Registry>) -> std::io::Result<Server> {
    let data = web::Data::new(registry);
    Ok(HttpServer::new(move || App::new().app_data(data.clone()).service(health).service(metrics))
        .workers(1)
        .disable_signals()
        .listen(listener)?
        .run())
}

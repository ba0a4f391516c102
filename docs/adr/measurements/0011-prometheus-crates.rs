use prometheus_client::{encoding::{EncodeLabelSet, text::encode}, metrics::{counter::Counter, family::Family, histogram::{Histogram, exponential_buckets}}, registry::Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels { method: &'static str, route: &'static str, status: u16 }

const ROUTES: [&str; 8] = ["/a", "/b", "/c", "/d", "/e", "/f", "/g", "/h"];

fn main() {
    let which = std::env::args().nth(1).unwrap();
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    let mut out = String::new();
    match which.as_str() {
        "client" => {
            let mut registry = Registry::with_prefix("svc");
            let requests = Family::<Labels, Counter>::default();
            let durations = Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 16)));
            registry.register("http_requests", "x", requests.clone());
            registry.register("http_request_duration_seconds", "x", durations.clone());
            for i in 0..n {
                let l = Labels { method: "GET", route: ROUTES[(i % 8) as usize], status: 200 };
                requests.get_or_create(&l).inc();
                durations.get_or_create(&l).observe((i % 1000) as f64 * 1e-5);
            }
            encode(&mut out, &registry).unwrap();
        }
        "prom" => {
            let registry = prometheus::Registry::new_custom(Some("svc".into()), None).unwrap();
            let requests = prometheus::IntCounterVec::new(prometheus::Opts::new("http_requests_total", "x"), &["method", "route", "status"]).unwrap();
            let durations = prometheus::HistogramVec::new(prometheus::HistogramOpts::new("http_request_duration_seconds", "x").buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).unwrap()), &["method", "route", "status"]).unwrap();
            registry.register(Box::new(requests.clone())).unwrap();
            registry.register(Box::new(durations.clone())).unwrap();
            for i in 0..n {
                let route = ROUTES[(i % 8) as usize];
                requests.with_label_values(&["GET", route, "200"]).inc();
                durations.with_label_values(&["GET", route, "200"]).observe((i % 1000) as f64 * 1e-5);
            }
            use prometheus::Encoder;
            let mut buf = Vec::new();
            prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
            out = String::from_utf8(buf).unwrap();
        }
        _ => panic!(),
    }
    println!("{} bytes", out.len());
}

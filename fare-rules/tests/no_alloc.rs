//! The hot path allocates nothing: a whole-journey quote and a validator's tap quote are run
//! under a counting global allocator.

use fare_rules::cases::SimCard;
use fare_rules::engine::{CardView, Engine, Leg, Rider, Tap};
use fare_rules::record::TapKind;
use fare_rules::synth::{city_source, metro_stop, rail_stop, CitySize};
use fare_rules::table::NONE;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// GlobalAlloc contract; the wrapper only counts allocations while COUNTING is set. `unsafe`
// is needed because implementing GlobalAlloc is an unsafe trait by definition.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed through unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (forwarded above).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; `ptr` came from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, ALLOCS.load(Ordering::SeqCst))
}

#[test]
fn quotes_allocate_nothing() {
    let size = CitySize::TOWN;
    let e =
        Engine::new(fare_rules::source::compile("town.toml", &city_source(size)).unwrap()).unwrap();
    let st = |s: &str| e.stop(s).unwrap();
    let t0 = 1_764_576_000; // 2025-12-01 08:00 local (a Monday)
    let last_metro = metro_stop(1, size.stops_per_metro_line - 1);
    let legs = [
        Leg {
            route: e.route("M1").unwrap(),
            from_stop: st(&metro_stop(1, 0)),
            to_stop: st(&last_metro),
            departure_s: t0,
            arrival_s: t0 + 1200,
        },
        Leg {
            route: e.route("R1").unwrap_or(e.route("R0").unwrap()),
            from_stop: st(&rail_stop(0, 1)),
            to_stop: st(&rail_stop(0, 3)),
            departure_s: t0 + 1500,
            arrival_s: t0 + 2400,
        },
        Leg {
            route: e.route("B1").unwrap(),
            from_stop: st(&metro_stop(1, 0)),
            to_stop: st(&fare_rules::synth::bus_stop(1, 4)),
            departure_s: t0 + 2700,
            arrival_s: t0 + 3300,
        },
    ];
    let rider = Rider {
        category: NONE,
        medium: NONE,
    };
    let (p, n) = counted(|| e.price_journey(rider, &legs));
    assert!(p.is_ok(), "{p:?}");
    assert_eq!(n, 0, "price_journey allocated {n} times");

    let mut card = SimCard::default();
    for l in &legs {
        for (kind, time, stop) in [
            (TapKind::In, l.departure_s, l.from_stop),
            (TapKind::Out, l.arrival_s, l.to_stop),
        ] {
            let view = CardView {
                rider,
                history: &card.history,
                passes: &[],
            };
            let tap = Tap {
                kind,
                time_s: time as u32,
                route: l.route,
                stop,
            };
            let (q, n) = counted(|| e.quote_tap(&view, &tap));
            assert_eq!(n, 0, "quote_tap allocated {n} times");
            card.write(&q.unwrap().record);
        }
    }
}

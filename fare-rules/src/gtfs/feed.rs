//! The fare-relevant rows of a GTFS feed, as loaded (each row remembers its line).

/// `agency.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgencyRow {
    pub line: u64,
    pub agency_id: String,
    pub agency_name: String,
    pub agency_timezone: String,
}

/// `feed_info.txt` (dates as days since 1970-01-01).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeedInfoRow {
    pub line: u64,
    pub feed_start_date: Option<i32>,
    pub feed_end_date: Option<i32>,
}

/// `stops.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopRow {
    pub line: u64,
    pub stop_id: String,
    pub parent_station: String,
    /// The fare zone (GTFS Fares v1 `fare_rules.txt` origin/destination/contains ids).
    pub zone_id: String,
}

/// `routes.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteRow {
    pub line: u64,
    pub route_id: String,
    pub network_id: String,
}

/// `networks.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkRow {
    pub line: u64,
    pub network_id: String,
    pub network_name: String,
}

/// `route_networks.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteNetworkRow {
    pub line: u64,
    pub route_id: String,
    pub network_id: String,
}

/// `areas.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AreaRow {
    pub line: u64,
    pub area_id: String,
    pub area_name: String,
}

/// `stop_areas.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopAreaRow {
    pub line: u64,
    pub area_id: String,
    pub stop_id: String,
}

/// `location_groups.txt`: a group of stops where a rider may request pickup or drop off
/// (on-demand service). The reference does not let fare files name one: loaded and checked,
/// never priced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocationGroupRow {
    pub line: u64,
    pub location_group_id: String,
    pub location_group_name: String,
}

/// `location_group_stops.txt`: a stop in a location group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocationGroupStopRow {
    pub line: u64,
    pub location_group_id: String,
    pub stop_id: String,
}

/// `calendar.txt` (weekday bit 0 = Monday; dates as days since 1970-01-01).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalendarRow {
    pub line: u64,
    pub service_id: String,
    pub weekdays: u8,
    pub start_day: i32,
    pub end_day: i32,
}

/// `calendar_dates.txt` (`exception_type` 1 added, 2 removed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalendarDateRow {
    pub line: u64,
    pub service_id: String,
    pub day: i32,
    pub exception_type: u8,
}

/// `timeframes.txt` (seconds after midnight, `[start_s, end_s)`; empty times = whole day).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimeframeRow {
    pub line: u64,
    pub timeframe_group_id: String,
    pub start_s: u32,
    pub end_s: u32,
    pub service_id: String,
}

/// `rider_categories.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RiderCategoryRow {
    pub line: u64,
    pub rider_category_id: String,
    pub rider_category_name: String,
    pub is_default_fare_category: bool,
}

/// `fare_media.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareMediaRow {
    pub line: u64,
    pub fare_media_id: String,
    pub fare_media_name: String,
    pub fare_media_type: u8,
}

/// `fare_products.txt` (`amount` exactly in minor units of `currency`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareProductRow {
    pub line: u64,
    pub fare_product_id: String,
    pub fare_product_name: String,
    pub rider_category_id: String,
    pub fare_media_id: String,
    pub amount_minor: i32,
    pub currency: String,
}

/// `fare_attributes.txt` (GTFS Fares v1; `price` exactly in minor units of `currency_type`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareAttributeRow {
    pub line: u64,
    pub fare_id: String,
    pub amount_minor: i32,
    pub currency: String,
    /// Transfers allowed on the fare (`None`: unlimited).
    pub transfers: Option<u8>,
    /// Seconds from the first boarding within which a transfer may start.
    pub transfer_duration: Option<u32>,
}

/// `fare_rules.txt` (GTFS Fares v1): the fare applies where every non-empty field matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareRuleRow {
    pub line: u64,
    pub fare_id: String,
    pub route_id: String,
    pub origin_id: String,
    pub destination_id: String,
    pub contains_id: String,
}

/// `fare_leg_rules.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareLegRuleRow {
    pub line: u64,
    pub leg_group_id: String,
    pub network_id: String,
    pub from_area_id: String,
    pub to_area_id: String,
    pub from_timeframe_group_id: String,
    pub to_timeframe_group_id: String,
    pub fare_product_id: String,
    pub rule_priority: Option<i32>,
}

/// `fare_leg_join_rules.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareLegJoinRuleRow {
    pub line: u64,
    pub from_network_id: String,
    pub to_network_id: String,
    pub from_stop_id: String,
    pub to_stop_id: String,
}

/// `fare_transfer_rules.txt` (`transfer_count` as written: -1 or ≥ 1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareTransferRuleRow {
    pub line: u64,
    pub from_leg_group_id: String,
    pub to_leg_group_id: String,
    pub transfer_count: Option<i32>,
    pub duration_limit: Option<u32>,
    pub duration_limit_type: Option<u8>,
    pub fare_transfer_type: u8,
    pub fare_product_id: String,
}

/// The fare-relevant rows of a GTFS feed. Absent optional files are empty (`None` for
/// `stops.txt` and `routes.txt`, whose absence changes how stops and routes are collected).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Feed {
    pub agencies: Vec<AgencyRow>,
    pub feed_info: Option<FeedInfoRow>,
    pub stops: Option<Vec<StopRow>>,
    pub routes: Option<Vec<RouteRow>>,
    pub networks: Vec<NetworkRow>,
    pub route_networks: Vec<RouteNetworkRow>,
    pub areas: Vec<AreaRow>,
    pub stop_areas: Vec<StopAreaRow>,
    pub location_groups: Vec<LocationGroupRow>,
    pub location_group_stops: Vec<LocationGroupStopRow>,
    pub calendar: Vec<CalendarRow>,
    pub calendar_dates: Vec<CalendarDateRow>,
    pub timeframes: Vec<TimeframeRow>,
    pub rider_categories: Vec<RiderCategoryRow>,
    pub fare_media: Vec<FareMediaRow>,
    pub fare_products: Vec<FareProductRow>,
    pub fare_leg_rules: Vec<FareLegRuleRow>,
    /// The `fare_leg_rules.txt` header has a `rule_priority` column.
    pub has_rule_priority: bool,
    pub fare_leg_join_rules: Vec<FareLegJoinRuleRow>,
    pub fare_transfer_rules: Vec<FareTransferRuleRow>,
    /// GTFS Fares v1, read only when the feed has no Fares v2 files.
    pub fare_attributes: Vec<FareAttributeRow>,
    pub fare_rules: Vec<FareRuleRow>,
}

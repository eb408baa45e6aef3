namespace UffdGrpc.Server.Configuration;

/// <summary>The <c>Server</c> configuration section: what a machine gets when its request does not say.</summary>
public sealed class ServerOptions
{
    public const string Section = "Server";

    /// <summary>The kernel profile of a CreateMachine without one: <c>6.18</c> (the default), <c>6.1</c> or <c>v5.7</c>.</summary>
    public string DefaultProfile { get; set; } = "6.18";

    /// <summary>The profile <see cref="DefaultProfile"/> names, or null when it names none.</summary>
    internal static Mm.KernelProfile? ParseProfile(string? s) => s?.Trim().ToLowerInvariant() switch
    {
        "6.18" or "v6.18" => Mm.KernelProfile.V6_18,
        "6.1" or "v6.1" => Mm.KernelProfile.V6_1,
        "5.7" or "v5.7" => Mm.KernelProfile.V5_7,
        _ => null,
    };

    /// <summary>The model profile of <see cref="DefaultProfile"/> (validated at start).</summary>
    internal Mm.KernelProfile Profile => ParseProfile(DefaultProfile) ?? Mm.KernelProfile.V6_18;
}

/// <summary>
/// The <c>Metrics</c> configuration section: where the OpenTelemetry metrics (meter
/// <c>UffdGrpc.Server</c>) and RPC traces (activity source <c>UffdGrpc.Server</c>) go.
/// </summary>
public sealed class MetricsOptions
{
    public const string Section = "Metrics";

    /// <summary>Serve the Prometheus text format at <see cref="PrometheusPath"/> (default true).</summary>
    public bool Prometheus { get; set; } = true;

    /// <summary>The scrape path (default <c>/metrics</c>), on every endpoint of the server.</summary>
    public string PrometheusPath { get; set; } = "/metrics";

    /// <summary>
    /// An extra HTTP/1.1 endpoint for scrapers that do not speak h2c (Prometheus itself), for
    /// example <c>http://0.0.0.0:9464</c>; unset (the default): the scrape path is served on
    /// the gRPC endpoints only (HTTP/2).
    /// </summary>
    public string? ListenUrl { get; set; }

    /// <summary>An OTLP collector (gRPC, e.g. <c>http://collector:4317</c>) that gets the metrics and the RPC traces; unset (the default): no OTLP export.</summary>
    public string? OtlpEndpoint { get; set; }

    /// <summary>How often metrics are pushed to <see cref="OtlpEndpoint"/>, in milliseconds (default 10000).</summary>
    public int OtlpExportIntervalMs { get; set; } = 10_000;
}

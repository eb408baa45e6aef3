using Microsoft.Extensions.DependencyInjection.Extensions;
using OpenTelemetry.Metrics;
using OpenTelemetry.Trace;
using UffdGrpc.Server.Configuration;
using UffdGrpc.Server.Telemetry;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers the server's OpenTelemetry metrics and traces and their exporters (the <c>Metrics</c> section).</summary>
public static class TelemetryServiceCollectionExtensions
{
    /// <summary>
    /// The meter <see cref="ServerMetrics.MeterName"/> (plus ASP.NET Core's and Kestrel's) for
    /// the Prometheus scrape endpoint and, with <c>Metrics:OtlpEndpoint</c>, an OTLP exporter
    /// that also gets an activity per RPC. Invalid values are reported at start by
    /// <see cref="OptionsValidators"/>; here they only leave an exporter out.
    /// </summary>
    public static IServiceCollection AddUffdTelemetry(this IServiceCollection services, IConfiguration configuration)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configuration);
        var section = configuration.GetSection(MetricsOptions.Section);
        var prometheus = !bool.TryParse(section[nameof(MetricsOptions.Prometheus)], out var p) || p;
        Uri? otlp = Uri.TryCreate(section[nameof(MetricsOptions.OtlpEndpoint)], UriKind.Absolute, out var u) ? u : null;
        var interval = int.TryParse(section[nameof(MetricsOptions.OtlpExportIntervalMs)], out var i) && i >= 100 ? i : new MetricsOptions().OtlpExportIntervalMs;
        services.TryAddSingleton<ServerMetrics>();
        var otel = services.AddOpenTelemetry().WithMetrics(b =>
        {
            b.AddMeter(ServerMetrics.MeterName, "Microsoft.AspNetCore.Hosting", "Microsoft.AspNetCore.Server.Kestrel");
            // Advice carries the same bounds; the view makes them explicit for every exporter.
            b.AddView("uffdgrpc.userfault.latency", new ExplicitBucketHistogramConfiguration { Boundaries = ServerMetrics.LatencyBuckets });
            if (prometheus)
                b.AddPrometheusExporter(o => o.ScrapeResponseCacheDurationMilliseconds = 0);
            if (otlp is not null)
            {
                b.AddOtlpExporter((e, r) =>
                {
                    e.Endpoint = otlp;
                    r.PeriodicExportingMetricReaderOptions.ExportIntervalMilliseconds = interval;
                });
            }
        });
        if (otlp is not null)
            otel.WithTracing(b => b.AddSource(ServerMetrics.MeterName).AddOtlpExporter(e => e.Endpoint = otlp));
        return services;
    }
}

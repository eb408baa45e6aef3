using Microsoft.Extensions.Options;
using UffdGrpc.Server;
using UffdGrpc.Server.Configuration;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Telemetry;

// A configuration value the server cannot start with ends it here with one line naming the
// key and the value, and exit status 2 (StartupFailure); every section is checked at start.
try
{
    var builder = WebApplication.CreateBuilder(ServerStartup.Options(args));
    ListenAddresses.Configure(builder);
    builder.Services.AddUffdServer();
    builder.Services.AddUffdTelemetry(builder.Configuration);

    var app = builder.Build();
    // Check every section now (ValidateOnStart), before anything reads one or logs.
    app.Services.GetRequiredService<IStartupValidator>().Validate();
    app.MapUffdServices();
    var metrics = app.Services.GetRequiredService<IOptions<MetricsOptions>>().Value;
    if (metrics.Prometheus)
        app.MapPrometheusScrapingEndpoint(metrics.PrometheusPath);
    // The meter subscribes to every machine as it is created, loaded ones included.
    app.Services.GetRequiredService<ServerMetrics>();
    // Graceful shutdown (SIGTERM): streams, pending accesses and waits end with UNAVAILABLE at
    // once, so Kestrel's drain finishes well inside the host's shutdown timeout.
    var registry = app.Services.GetRequiredService<MachineRegistry>();
    // Persistence (off unless Persistence:Directory is set): load at start, save on shutdown,
    // after every waiter has been ended so nothing changes while it is written.
    var persistence = app.Services.GetRequiredService<MachinePersistence>();
    persistence.LoadAll();
    var auth = app.Services.GetRequiredService<IOptions<UffdGrpc.Server.Security.AuthOptions>>().Value;
    var startupLog = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("UffdGrpc.Server");
    Log.AuthMode(startupLog, auth.Anonymous, auth.Tokens.Count);
    if (auth.Anonymous == UffdGrpc.Server.Security.AnonymousAccess.Allow)
        Log.AnonymousFromAnywhere(startupLog);
    Log.Telemetry(startupLog, metrics.Prometheus ? metrics.PrometheusPath : "off", metrics.ListenUrl ?? "(the gRPC endpoints)", metrics.OtlpEndpoint ?? "off");
    app.Lifetime.ApplicationStopping.Register(() =>
    {
        registry.Shutdown();
        persistence.SaveAll();
    });
    app.Run();
    return 0;
}
catch (Exception ex) when (StartupFailure.IsConfiguration(ex, out var message))
{
    Console.Error.WriteLine(message);
    return StartupFailure.ExitCode;
}

/// <summary>The server's entry point (public for WebApplicationFactory).</summary>
public partial class Program;

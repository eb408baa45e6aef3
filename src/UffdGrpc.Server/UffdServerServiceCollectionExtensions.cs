using Microsoft.Extensions.Diagnostics.HealthChecks;
using UffdGrpc.Server.Hosting;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers the UffdGrpc server: gRPC with the API's limits, the machine registry, health and reflection.</summary>
public static class UffdServerServiceCollectionExtensions
{
    /// <summary>
    /// The largest request the server reads: a 64 MiB UFFDIO_COPY payload plus its framing.
    /// A larger message is rejected with RESOURCE_EXHAUSTED before any service code runs.
    /// </summary>
    public const int MaxReceiveMessageSize = (64 << 20) + (64 << 10);

    public static IServiceCollection AddUffdServer(this IServiceCollection services)
    {
        ArgumentNullException.ThrowIfNull(services);
        services.AddGrpc(o =>
        {
            o.MaxReceiveMessageSize = MaxReceiveMessageSize;
            o.EnableDetailedErrors = false;
            o.Interceptors.Add<ServerErrorInterceptor>();
            o.Interceptors.Add<UffdGrpc.Server.Security.AuthInterceptor>();
            // Outside the injection interceptor: a wire rule's decision is a journaled step.
            o.Interceptors.Add<JournalInterceptor>();
            o.Interceptors.Add<InjectionInterceptor>();
        });
        // A stopping server ends its streams and waits itself (MachineRegistry.Shutdown); the
        // host then has 5 s for everything else.
        services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(5));
        services.AddGrpcReflection();
        services.AddGrpcHealthChecks().AddCheck("model", () => HealthCheckResult.Healthy("in-memory model"));
        services.AddSingleton<MachineRegistry>();
        services.AddSingleton<UffdGrpc.Server.Security.Quotas>();
        services.AddSingleton<MachinePersistence>();
        services.AddOptions<PersistenceOptions>().BindConfiguration(PersistenceOptions.Section);
        services.AddOptions<WatchdogOptions>()
            .BindConfiguration(WatchdogOptions.Section)
            .Validate(o => o.UserfaultSeconds >= 0 && double.IsFinite(o.UserfaultSeconds), "Watchdog:UserfaultSeconds must be 0 (off) or a positive number of seconds")
            .ValidateOnStart();
        services.AddOptions<UffdGrpc.Server.Security.LimitOptions>()
            .BindConfiguration(UffdGrpc.Server.Security.LimitOptions.Section)
            .Validate(o => o.ServerMemoryBytes >= 1 << 20 && o.MaxMachineMemoryBytes >= 1 << 20, "Limits: ServerMemoryBytes and MaxMachineMemoryBytes must be at least 1 MiB")
            .Validate(o => o.MachinesPerPrincipal > 0 && o.StreamsPerPrincipal > 0 && o.MmsPerMachine > 0 && o.ThreadsPerMachine > 0 && o.UffdsPerMachine > 0 && o.FilesPerMachine > 0 && o.CompletionLogPerMachine > 0 && o.JournalEntriesPerMachine > 0 && o.JournalBytesPerMachine > 0, "Limits: every limit must be positive")
            .ValidateOnStart();
        services.AddOptions<UffdGrpc.Server.Security.AuthOptions>()
            .BindConfiguration(UffdGrpc.Server.Security.AuthOptions.Section)
            .Validate(o => o.Tokens.All(t => t.Key.Length > 0 && t.Value.Length >= 16), "Auth:Tokens: every token must have a principal name and at least 16 characters")
            .Validate(o => o.Tokens.Values.Distinct(StringComparer.Ordinal).Count() == o.Tokens.Count, "Auth:Tokens: two principals share a token")
            .Validate(o => Enum.IsDefined(o.Anonymous), "Auth:Anonymous must be Loopback, Allow or Deny")
            .ValidateOnStart();
        // One message limit for the whole transport: gRPC's per-message limit above is the
        // only bound on a request (a Serve stream's body is as long as the stream lives).
        services.Configure<Microsoft.AspNetCore.Server.Kestrel.Core.KestrelServerOptions>(o => o.Limits.MaxRequestBodySize = null);
        return services;
    }
}

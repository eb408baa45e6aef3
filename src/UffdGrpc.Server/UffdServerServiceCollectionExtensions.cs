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
        });
        // A stopping server ends its streams and waits itself (MachineRegistry.Shutdown); the
        // host then has 5 s for everything else.
        services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(5));
        services.AddGrpcReflection();
        services.AddGrpcHealthChecks().AddCheck("model", () => HealthCheckResult.Healthy("in-memory model"));
        services.AddSingleton<MachineRegistry>();
        return services;
    }
}

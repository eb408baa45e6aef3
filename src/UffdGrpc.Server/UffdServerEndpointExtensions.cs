using UffdGrpc.Server.Services;

namespace Microsoft.AspNetCore.Builder;

/// <summary>Maps the UffdGrpc services, gRPC health and reflection (the server's and any in-process host's one list).</summary>
public static class UffdServerEndpointExtensions
{
    public static WebApplication MapUffdServices(this WebApplication app)
    {
        ArgumentNullException.ThrowIfNull(app);
        app.MapGrpcService<MachineService>();
        app.MapGrpcService<MmService>();
        app.MapGrpcService<ThreadService>();
        app.MapGrpcService<UserfaultfdService>();
        app.MapGrpcService<FaultInjectionService>();
        app.MapGrpcService<WorkloadService>();
        app.MapGrpcService<MigrationMetricsService>();
        app.MapGrpcHealthChecksService();
        app.MapGrpcReflectionService();
        return app;
    }
}

using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Options;
using UffdGrpc.Server.Configuration;
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
            // Telemetry, errors, auth, the kernel backend, the journal and injection, in that
            // order, as one interceptor (CallPipeline says why and what each stage does).
            o.Interceptors.Add<CallPipeline>();
        });
        // A stopping server ends its streams and waits itself (MachineRegistry.Shutdown); the
        // host then has 5 s for everything else.
        services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(5));
        // The interceptor stages hold no per-call state: one instance each for the server's life
        // (grpc-dotnet resolves a registered interceptor from DI; an unregistered one is
        // constructed and disposed on every call).
        services.TryAddSingleton<UffdGrpc.Server.Telemetry.TelemetryInterceptor>();
        services.TryAddSingleton<ServerErrorInterceptor>();
        services.TryAddSingleton<UffdGrpc.Server.Security.AuthInterceptor>();
        services.TryAddSingleton<UffdGrpc.Server.Hosting.Kernel.KernelBackendInterceptor>();
        services.TryAddSingleton<JournalInterceptor>();
        services.TryAddSingleton<InjectionInterceptor>();
        services.TryAddSingleton<CallPipeline>();
        // The services hold no per-call state either: registered, they are resolved, not
        // constructed with their dependencies on every call.
        services.TryAddSingleton<UffdGrpc.Server.Services.MachineService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.MmService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.ThreadService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.UserfaultfdService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.FaultInjectionService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.WorkloadService>();
        services.TryAddSingleton<UffdGrpc.Server.Services.MigrationMetricsService>();
        services.AddGrpcReflection();
        services.AddGrpcHealthChecks().AddCheck("model", () => HealthCheckResult.Healthy("in-memory model"));
        services.AddSingleton<MachineRegistry>();
        // The meter exists in every host of the services (the telemetry interceptor feeds it);
        // AddUffdTelemetry exports it.
        services.TryAddSingleton<UffdGrpc.Server.Telemetry.ServerMetrics>();
        services.AddSingleton<UffdGrpc.Server.Security.Quotas>();
        services.AddSingleton<MachinePersistence>();
        services.AddSingleton<UffdGrpc.Server.Hosting.Kernel.KernelBackend>();
        // Every section is checked at start (OptionsValidators: each failure names its key and
        // value); a key the section does not have is an error too, so a typo is not ignored.
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<PersistenceOptions>, OptionsValidators>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<UffdGrpc.Server.Security.LimitOptions>, OptionsValidators>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<UffdGrpc.Server.Security.AuthOptions>, OptionsValidators>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<ServerOptions>, OptionsValidators>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<MetricsOptions>, OptionsValidators>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<WatchdogOptions>, OptionsValidators>());
        static void Strict(BinderOptions b) => b.ErrorOnUnknownConfiguration = true;
        services.AddOptions<PersistenceOptions>().BindConfiguration(PersistenceOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<UffdGrpc.Server.Security.LimitOptions>().BindConfiguration(UffdGrpc.Server.Security.LimitOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<UffdGrpc.Server.Security.AuthOptions>().BindConfiguration(UffdGrpc.Server.Security.AuthOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<ServerOptions>().BindConfiguration(ServerOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<MetricsOptions>().BindConfiguration(MetricsOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<WatchdogOptions>().BindConfiguration(WatchdogOptions.Section, Strict).ValidateOnStart();
        services.AddOptions<UffdGrpc.Server.Hosting.Kernel.KernelBackendOptions>().BindConfiguration(UffdGrpc.Server.Hosting.Kernel.KernelBackendOptions.Section, Strict).ValidateOnStart();
        // One message limit for the whole transport: gRPC's per-message limit above is the
        // only bound on a request (a Serve stream's body is as long as the stream lives).
        services.Configure<Microsoft.AspNetCore.Server.Kestrel.Core.KestrelServerOptions>(o => o.Limits.MaxRequestBodySize = null);
        return services;
    }
}

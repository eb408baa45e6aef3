using DotNet.Testcontainers.Builders;
using DotNet.Testcontainers.Containers;
using Grpc.Health.V1;
using Grpc.Net.Client;
using UffdGrpc.Client;
using Xunit;

namespace UffdGrpc.Testing;

/// <summary>
/// An xunit fixture that starts the UffdGrpc server image with Testcontainers (any
/// Docker-compatible engine: Docker, or podman's API service) on a random loopback port,
/// waits for gRPC health SERVING and hands the test a connected <see cref="Client"/>.
/// Where no engine is configured it starts nothing and <see cref="SkipReason"/> says why.
/// </summary>
/// <remarks>
/// The image is <c>$UFFDGRPC_IMAGE</c> (default <see cref="DefaultImage"/>; build it with
/// docker/Dockerfile). The engine is <c>$DOCKER_HOST</c> or /var/run/docker.sock; for podman:
/// <c>podman system service --time=0 unix:///run/podman/podman.sock &amp;</c> and
/// <c>DOCKER_HOST=unix:///run/podman/podman.sock</c>. Without a registry, set
/// <c>TESTCONTAINERS_RYUK_DISABLED=true</c> (the reaper is an image of its own); the fixture
/// removes its container itself.
/// </remarks>
public class UffdContainerFixture : IAsyncLifetime, IDisposable
{
    /// <summary>The image started when <c>UFFDGRPC_IMAGE</c> is not set.</summary>
    public const string DefaultImage = "localhost/uffdgrpc-server:latest";

    private IContainer? _container;
    private UffdClient? _client;

    /// <summary>The image this fixture starts.</summary>
    public static string Image => Environment.GetEnvironmentVariable("UFFDGRPC_IMAGE") is { Length: > 0 } i ? i : DefaultImage;

    /// <summary>Why no container can be started here (no engine configured), or null when one was started.</summary>
    public string? SkipReason { get; private set; }

    /// <summary>The server's address on the host (http://127.0.0.1:PORT).</summary>
    public string Address { get; private set; } = "";

    /// <summary>A client of the server in the container.</summary>
    public UffdClient Client => _client ?? throw new InvalidOperationException(SkipReason ?? "the fixture is not initialized");

    /// <summary>How long the fixture waits for the server to answer SERVING (default 60 s).</summary>
    protected virtual TimeSpan StartTimeout => TimeSpan.FromSeconds(60);

    /// <summary>Why no engine is reachable here (null when $DOCKER_HOST is set or /var/run/docker.sock exists).</summary>
    public static string? EngineUnavailable() =>
        Environment.GetEnvironmentVariable("DOCKER_HOST") is { Length: > 0 } || File.Exists("/var/run/docker.sock")
            ? null
            : "no container engine: set DOCKER_HOST (podman: `podman system service --time=0 unix:///run/podman/podman.sock` and DOCKER_HOST=unix:///run/podman/podman.sock) or start Docker";

    public async Task InitializeAsync()
    {
        SkipReason = EngineUnavailable();
        if (SkipReason is not null)
            return;
        _container = new ContainerBuilder(Image)
            .WithPortBinding(8080, assignRandomHostPort: true)
            // Published ports do not arrive from loopback inside the container.
            .WithEnvironment("Auth__Anonymous", "Allow")
            .WithWaitStrategy(Wait.ForUnixContainer().UntilMessageIsLogged("Now listening on"))
            .Build();
        using var start = new CancellationTokenSource(StartTimeout);
        await _container.StartAsync(start.Token).ConfigureAwait(false);
        Address = $"http://{_container.Hostname}:{_container.GetMappedPublicPort(8080)}";
        await WaitServingAsync(Address, start.Token).ConfigureAwait(false);
        _client = new UffdClient(Address);
    }

    private static async Task WaitServingAsync(string address, CancellationToken ct)
    {
        using var channel = GrpcChannel.ForAddress(address);
        var health = new Health.HealthClient(channel);
        while (true)
        {
            try
            {
                var r = await health.CheckAsync(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(2), cancellationToken: ct).ConfigureAwait(false);
                if (r.Status == HealthCheckResponse.Types.ServingStatus.Serving)
                    return;
            }
            catch (Grpc.Core.RpcException) when (!ct.IsCancellationRequested)
            {
                // Not listening yet.
            }
            await Task.Delay(100, ct).ConfigureAwait(false);
        }
    }

    public async Task DisposeAsync()
    {
        _client?.Dispose();
        _client = null;
        if (_container is not null)
            await _container.DisposeAsync().ConfigureAwait(false);
        _container = null;
    }

    /// <summary>Removes the container (xunit calls <see cref="DisposeAsync"/>; this is for other hosts).</summary>
    public void Dispose()
    {
        DisposeAsync().GetAwaiter().GetResult();
        GC.SuppressFinalize(this);
    }
}

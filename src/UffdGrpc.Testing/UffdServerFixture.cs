using Grpc.Net.Client;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.Extensions.Logging;
using UffdGrpc.Client;
using Xunit;

namespace UffdGrpc.Testing;

/// <summary>
/// An xunit fixture (<c>IClassFixture&lt;UffdServerFixture&gt;</c>) that runs the UffdGrpc
/// server in-process — its real startup on ASP.NET Core's in-memory TestServer, HTTP/2 end to
/// end, no port — and hands the test a connected <see cref="Client"/>. Derive and override
/// <see cref="Settings"/> to start it with other configuration (limits, tokens, profile).
/// </summary>
public class UffdServerFixture : IAsyncLifetime, IDisposable
{
    private readonly ServerFactory _factory;
    private readonly List<GrpcChannel> _channels = [];
    private UffdClient? _client;

    public UffdServerFixture() => _factory = new ServerFactory(this);

    /// <summary>A client of the server (anonymous, which the server accepts from its in-memory loopback).</summary>
    public UffdClient Client => _client ?? throw new InvalidOperationException("the fixture is not initialized");

    /// <summary>The server's services (the machine registry, options), for assertions on server state.</summary>
    public IServiceProvider Services => _factory.Services;

    /// <summary>Configuration the server starts with, on top of its appsettings.json (keys with ':', e.g. <c>Limits:MachinesPerPrincipal</c>).</summary>
    protected virtual IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>();

    /// <summary>Another client of the same server, with a bearer token when given.</summary>
    public UffdClient NewClient(string? bearerToken = null)
    {
        var o = UffdClient.ChannelOptions(bearerToken);
        o.HttpHandler = _factory.Server.CreateHandler();
        var channel = GrpcChannel.ForAddress(_factory.Server.BaseAddress, o);
        lock (_channels)
            _channels.Add(channel);
        return new UffdClient(channel);
    }

    public Task InitializeAsync()
    {
        _client = NewClient();
        return Task.CompletedTask;
    }

    public Task DisposeAsync()
    {
        Dispose();
        return Task.CompletedTask;
    }

    public void Dispose()
    {
        lock (_channels)
        {
            foreach (var c in _channels)
                c.Dispose();
            _channels.Clear();
        }
        _factory.Dispose();
        GC.SuppressFinalize(this);
    }

    private sealed class ServerFactory(UffdServerFixture owner) : WebApplicationFactory<Program>
    {
        protected override void ConfigureWebHost(IWebHostBuilder builder)
        {
            foreach (var (key, value) in owner.Settings)
                builder.UseSetting(key, value);
            // Warnings and errors reach the test output; the server's Information lines do not.
            builder.ConfigureLogging(l => l.ClearProviders().AddConsole().AddFilter<Microsoft.Extensions.Logging.Console.ConsoleLoggerProvider>((_, level) => level >= LogLevel.Warning));
        }
    }
}

using System.Collections.Concurrent;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>
/// The real server startup on an in-memory HTTP/2 TestServer, with a GrpcChannel over it.
/// Server errors are collected: a test that does not expect one asserts <see cref="Errors"/> is empty.
/// </summary>
public class GrpcTestFixture : WebApplicationFactory<Program>
{
    private readonly ConcurrentQueue<string> _errors = new();
    private GrpcChannel? _channel;

    public IReadOnlyCollection<string> Errors => _errors;

    /// <summary>
    /// Runs <paramref name="body"/> with a new client and a machine of its own, destroys the
    /// machine whatever the body did, then asserts the server logged no error.
    /// </summary>
    public async Task InMachineAsync(Func<UffdClient, long, Task> body)
    {
        var c = NewClient();
        var m = (await c.CreateMachineAsync()).MachineId;
        try
        {
            await body(c, m);
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
        Assert.Empty(Errors);
    }

    public GrpcChannel Channel => _channel ??= CreateChannel();

    public GrpcChannel CreateChannel(string? bearerToken = null)
    {
        var o = UffdClient.ChannelOptions(bearerToken);
        o.HttpHandler = Server.CreateHandler();
        return GrpcChannel.ForAddress(Server.BaseAddress, o);
    }

    /// <summary>Settings the server starts with (for example Auth:Tokens:alice), on top of appsettings.json.</summary>
    protected virtual IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>();

    public UffdClient NewClient() => new(Channel);

    protected override void ConfigureWebHost(IWebHostBuilder builder)
    {
        foreach (var (key, value) in Settings)
            builder.UseSetting(key, value);
        // The test output shows a server's warnings and errors only (its Information lines
        // would flood it); errors are also collected for the test to assert on.
        builder.ConfigureLogging(l => l.ClearProviders().AddConsole().AddFilter<Microsoft.Extensions.Logging.Console.ConsoleLoggerProvider>((_, level) => level >= LogLevel.Warning));
        builder.ConfigureServices(s => s.AddSingleton<ILoggerProvider>(new SinkProvider(_errors)));
    }

    protected override void Dispose(bool disposing)
    {
        _channel?.Dispose();
        base.Dispose(disposing);
    }

    private sealed class SinkProvider(ConcurrentQueue<string> errors) : ILoggerProvider
    {
        public ILogger CreateLogger(string categoryName) => new Sink(categoryName, errors);

        public void Dispose()
        {
        }
    }

    private sealed class Sink(string category, ConcurrentQueue<string> errors) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Error;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (logLevel >= LogLevel.Error)
                errors.Enqueue($"{category}: {formatter(state, exception)} {exception}");
        }
    }
}

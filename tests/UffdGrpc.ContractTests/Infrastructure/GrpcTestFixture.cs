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
public sealed class GrpcTestFixture : WebApplicationFactory<Program>
{
    private readonly ConcurrentQueue<string> _errors = new();
    private GrpcChannel? _channel;

    public IReadOnlyCollection<string> Errors => _errors;

    public GrpcChannel Channel => _channel ??= CreateChannel();

    public GrpcChannel CreateChannel() => GrpcChannel.ForAddress(Server.BaseAddress, new GrpcChannelOptions
    {
        HttpHandler = Server.CreateHandler(),
        MaxReceiveMessageSize = 64 << 20,
    });

    public UffdClient NewClient() => new(Channel);

    protected override void ConfigureWebHost(IWebHostBuilder builder)
    {
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

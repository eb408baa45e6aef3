using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;

namespace UffdGrpc.Cli;

/// <summary>
/// The real services hosted in this process on a loopback port, for the commands that run
/// against an embedded server unless given <c>--server URL</c> (<c>session replay</c>,
/// <c>recipe</c>).
/// </summary>
internal static class InProcessServer
{
    /// <summary>Runs <paramref name="fn"/> with <paramref name="url"/>, or, when it is null, with the address of the services hosted in-process for the call's duration.</summary>
    public static async Task<T> WithUrlAsync<T>(string? url, Func<string, Task<T>> fn)
    {
        if (url is not null)
            return await fn(url).ConfigureAwait(false);
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { ContentRootPath = AppContext.BaseDirectory });
        // Only warnings and errors of the hosted server reach the terminal.
        builder.Configuration["Logging:LogLevel:Default"] = "Warning";
        builder.Configuration["Logging:LogLevel:Microsoft.Hosting.Lifetime"] = "Warning";
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, l => l.Protocols = HttpProtocols.Http2));
        builder.Services.AddUffdServer();
        await using var app = builder.Build();
        app.MapUffdServices();
        await app.StartAsync().ConfigureAwait(false);
        try
        {
            var address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
            return await fn(address).ConfigureAwait(false);
        }
        finally
        {
            await app.StopAsync().ConfigureAwait(false);
        }
    }
}

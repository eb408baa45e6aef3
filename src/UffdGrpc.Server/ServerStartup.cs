namespace UffdGrpc.Server;

/// <summary>Host options that do not depend on where the server was started from.</summary>
internal static class ServerStartup
{
    /// <summary>
    /// The content root is the working directory, as usual, unless that directory has no
    /// appsettings.json (the server started as <c>dotnet path/UffdGrpc.Server.dll</c> from
    /// elsewhere) and nobody chose one: then it is the application's directory, so the
    /// h2c default (Kestrel:EndpointDefaults:Protocols) still applies.
    /// </summary>
    public static WebApplicationOptions Options(string[] args)
    {
        var chosen = args.Any(a => a.Contains("contentRoot", StringComparison.OrdinalIgnoreCase))
            || Environment.GetEnvironmentVariable("ASPNETCORE_CONTENTROOT") is not null
            || Environment.GetEnvironmentVariable("DOTNET_CONTENTROOT") is not null;
        var here = File.Exists(Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json"));
        return new WebApplicationOptions
        {
            Args = args,
            ContentRootPath = chosen || here ? null : AppContext.BaseDirectory,
        };
    }
}

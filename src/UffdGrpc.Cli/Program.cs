using UffdGrpc.Cli;

return await CliCommands.Build().Parse(args).InvokeAsync().ConfigureAwait(false);

"""The package version and the command's name, in a module of their own so that submodules need not import the
package root."""

__version__ = "0.1.0"
#: the command and the package: what the CLI calls itself (not the MedBridge method, which the registry names)
PROGRAM = "medbridge"

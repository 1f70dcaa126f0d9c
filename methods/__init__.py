"""Method plug-ins. Every module here registers its methods with `cilbench.kit.contract.register`."""
